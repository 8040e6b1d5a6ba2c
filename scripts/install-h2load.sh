#!/bin/sh
# Puts h2load (the HTTP/2 load generator of nghttp2) at $1 for `make bench`:
# the one on PATH if there is one, else the binary out of Debian's
# `nghttp2-client` package, unpacked next to $1 with those of its libraries
# this machine lacks (libev, jansson, ...), and $1 a wrapper that finds them.
# Only files are unpacked: nothing is installed system-wide. Needs apt-get (and
# root on a machine that has no package lists yet); runs without questions,
# and again does the same.
set -eu
case $1 in
    /*) target=$1 ;;
    *) target=$PWD/$1 ;;
esac
found=$(command -v h2load || true)
if [ -n "$found" ] && [ "$(readlink -f "$found")" != "$(readlink -f "$target" 2>/dev/null || echo "$target")" ]; then
    ln -sf "$found" "$target"
    exit 0
fi
home=$(dirname "$target")/../lib/h2load
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt fetches as its own unprivileged user, as into its own cache.
chown _apt "$work" 2>/dev/null || true
cd "$work"
if ! apt-cache show nghttp2-client >/dev/null 2>&1; then
    apt-get update -q >/dev/null  # a new machine has no package lists yet
fi
# The client and each library it depends on that is not installed; the C and
# C++ runtimes always are (and must come from the system, not from here).
packages=nghttp2-client
for dependency in $(apt-cache depends nghttp2-client | awk '/Depends:/ {print $2}'); do
    case $dependency in libc6 | libgcc-s1 | libstdc++6 | "<"*) continue ;; esac
    if ! dpkg-query -W -f='${Status}' "$dependency" 2>/dev/null | grep -q "ok installed"; then
        packages="$packages $dependency"
    fi
done
# shellcheck disable=SC2086 # one word per package
apt-get download -q $packages >/dev/null
rm -rf "$home"
mkdir -p "$home"
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$home"
done
home=$(cd "$home" && pwd)
libs=$(find "$home/usr/lib" -name '*.so*' -exec dirname {} \; 2>/dev/null | sort -u | tr '\n' ':')
cat >"$target" <<WRAPPER
#!/bin/sh
LD_LIBRARY_PATH="${libs}\${LD_LIBRARY_PATH:-}" exec "$home/usr/bin/h2load" "\$@"
WRAPPER
chmod 0755 "$target"
"$target" --version 2>&1 | head -n 1

#!/bin/sh
# Puts promtool at $1 for the tests of deploy/prometheus: the one on PATH if
# there is one, else the promtool binary out of Debian's `prometheus` package.
# Only that binary is unpacked: installing the package would also set up and
# start a Prometheus server. Needs apt-get (and root on a machine that has no
# package lists yet); runs without questions, and again does the same.
set -eu
case $1 in
    /*) target=$1 ;;
    *) target=$PWD/$1 ;;
esac
found=$(command -v promtool || true)
if [ -n "$found" ] && [ "$(readlink -f "$found")" != "$(readlink -f "$target" 2>/dev/null || echo "$target")" ]; then
    ln -sf "$found" "$target"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt fetches as its own unprivileged user, as into its own cache.
chown _apt "$work" 2>/dev/null || true
cd "$work"
if ! apt-get download -q prometheus >/dev/null 2>&1; then
    apt-get update -q >/dev/null  # a new machine has no package lists yet
    apt-get download -q prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb unpacked
install -m 0755 unpacked/usr/bin/promtool "$target"
"$target" --version 2>&1 | head -n 1

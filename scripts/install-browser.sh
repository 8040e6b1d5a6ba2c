#!/bin/sh
# Installs what the console's browser tests drive, from Debian's packages when
# missing: chromium (headless), chromium-driver (chromedriver, for selenium)
# and fonts-noto-cjk (the zh-CN pages and screenshots). Needs apt-get and root,
# or sudo; runs without questions, and does nothing when all three are there.
set -eu
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
dpkg -s fonts-noto-cjk >/dev/null 2>&1 || missing="$missing fonts-noto-cjk"
[ -z "$missing" ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing$missing"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # one word per package
if ! $sudo apt-get install -y -q --no-install-recommends $missing >/dev/null; then
    $sudo apt-get update -q >/dev/null  # a new machine has no package lists yet
    $sudo apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
chromium --version

#!/usr/bin/env bash
# The browser the page tests drive (tests marked `browser`): Debian's Chromium, driven by Playwright's Python
# package from .venv (scripts/setup_env.sh installs it). Playwright never downloads a browser of its own here:
# the tests launch /usr/bin/chromium (override with CHROMIUM=PATH). Needs root or sudo for apt-get on Debian/Ubuntu.
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: no $CHROMIUM and no apt-get: install Chromium and set CHROMIUM=PATH" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null

#!/bin/sh
# What tests/test_playground.py needs beyond requirements-dev.txt: Chromium at /usr/bin/chromium (Playwright drives
# it and never downloads a browser of its own). Installs Debian's `chromium` with apt-get when it is missing (through
# sudo when not root); where there is no apt-get, says in one line what to install. The README's test command and
# .ci/run call it; it does nothing when Chromium is there.
set -eu
[ -x /usr/bin/chromium ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: tests/test_playground.py needs Chromium at /usr/bin/chromium and there is no apt-get here:" \
         "install Chromium with your system's package manager, then run the tests again" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "error: tests/test_playground.py needs Chromium at /usr/bin/chromium: as root, run" \
             "apt-get install chromium, then run the tests again" >&2
        exit 1
    fi
    sudo="sudo"
fi
echo "installing Debian's chromium for tests/test_playground.py (apt-get; once)" >&2
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

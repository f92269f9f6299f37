#!/bin/sh
# The browser test drives a system Chromium (no browser download from npm): Debian's `chromium`
# package, installed here when missing and when we may (root with apt-get, as in CI). $CHROMIUM
# names another binary. Prints the binary's path.
set -eu
bin="${CHROMIUM:-}"
if [ -z "$bin" ]; then
  for c in /usr/bin/chromium /usr/bin/chromium-browser; do [ -x "$c" ] && bin="$c" && break; done
fi
if [ -z "$bin" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: installing Debian's chromium package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >&2 || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends chromium >&2; }
    bin=/usr/bin/chromium
  else
    echo "ensure-chromium: no chromium found; install it (apt-get install chromium) or set CHROMIUM=/path/to/chromium" >&2
    exit 1
  fi
fi
[ -x "$bin" ] || { echo "ensure-chromium: '$bin' is not an executable" >&2; exit 1; }
echo "$bin"

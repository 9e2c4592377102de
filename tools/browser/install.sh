#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/browser, tests/jupyterhub/test_dashboard.py),
# driven by playwright's Python API (playwright's own browser download is not used), and
# Debian's firefox-esr with puppeteer-core for the Firefox smoke test (install-firefox.sh).
# Idempotent and quick when present; prints chromium's path (last).
set -euo pipefail
EXE=/usr/bin/chromium
if [ ! -x "$EXE" ]; then
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq chromium >/dev/null
fi
test -x "$EXE"
bash "$(dirname "${BASH_SOURCE[0]}")/install-firefox.sh" >/dev/null
echo "$EXE"

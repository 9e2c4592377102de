#!/usr/bin/env bash
# Debian's firefox-esr and puppeteer-core (npm), which drives it over WebDriver BiDi,
# for the dashboard's Firefox smoke test (tests/browser/test_firefox.py).  Playwright
# cannot drive a stock Firefox (it needs its own patched build); Firefox speaks
# WebDriver BiDi itself, and puppeteer-core needs no driver binary and downloads no
# browser.  puppeteer-core goes into a cache outside the repository, keyed by version.
# Idempotent and quick when present; prints the directory of puppeteer-core's package.
#
#   PUPPETEER_VERSION=24.43.1 KBATCH_CACHE_DIR=/somewhere tools/browser/install-firefox.sh
set -euo pipefail

version="${PUPPETEER_VERSION:-24.43.1}"  # 25 needs Node 22; Debian 12 has Node 18/20
cache="${KBATCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kbatch}"
prefix="$cache/npm/puppeteer-core-$version"
module="$prefix/node_modules/puppeteer-core"

if ! command -v firefox-esr >/dev/null; then
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq firefox-esr >/dev/null
fi
command -v firefox-esr >/dev/null

if [[ ! -f "$prefix/.complete" ]]; then
  for tool in node npm; do
    if ! command -v "$tool" >/dev/null; then
      echo "install-firefox.sh: $tool is not installed (apt-get install nodejs npm)" >&2
      exit 1
    fi
  done
  # Built beside the target and moved into place: an interrupted install leaves no
  # half-filled cache entry.
  mkdir -p "$cache/npm"
  tmp="$(mktemp -d "$cache/npm/.puppeteer-core-$version.XXXXXX")"
  chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix "$tmp" --no-audit --no-fund \
    --loglevel=error "puppeteer-core@$version" >&2
  touch "$tmp/.complete"
  rm -rf "$prefix"
  mv "$tmp" "$prefix"
  trap - EXIT
fi
test -f "$module/package.json"
echo "$module"

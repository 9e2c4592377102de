#!/usr/bin/env bash
# Install configurable-http-proxy (JupyterHub's proxy) from npm into a cache
# outside the repository, keyed by version; print the path of its executable.
# Idempotent: when that version is already there it only prints the path.
#
#   tools/jupyterhub/install-proxy.sh            # the pinned version
#   CHP_VERSION=5.3.0 tools/jupyterhub/install-proxy.sh
#   KBATCH_CACHE_DIR=/somewhere tools/jupyterhub/install-proxy.sh
set -euo pipefail

version="${CHP_VERSION:-5.3.0}"
cache="${KBATCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kbatch}"
prefix="$cache/npm/chp-$version"
exe="$prefix/node_modules/.bin/configurable-http-proxy"

if [[ -x "$exe" && -f "$prefix/.complete" ]]; then
    echo "$exe"
    exit 0
fi

for tool in node npm; do
    if ! command -v "$tool" >/dev/null; then
        echo "install-proxy.sh: $tool is not installed; install Node.js 18 or newer (e.g. apt-get install nodejs npm)" >&2
        exit 1
    fi
done

# Build in a temporary directory beside the target and move it into place, so an
# interrupted install never leaves a half-filled cache entry behind.
mkdir -p "$cache/npm"
tmp="$(mktemp -d "$cache/npm/.chp-$version.XXXXXX")"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error \
    "configurable-http-proxy@$version" >&2
touch "$tmp/.complete"
rm -rf "$prefix"
mv "$tmp" "$prefix"
trap - EXIT
echo "$exe"

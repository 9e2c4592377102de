#!/usr/bin/env bash
# Build helm from the Go module proxy into a cache outside the repo, keyed by
# version, so only the first run on a machine pays for it. Prints the binary's path.
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v3.18.6}"
cache="${KBATCH_HELM_CACHE:-$HOME/.cache/kbatch/helm}/$HELM_VERSION"
if [[ -x "$cache/helm" ]]; then
    echo "$cache/helm"
    exit 0
fi
mkdir -p "$cache"
echo "building helm $HELM_VERSION into $cache (first run only)" >&2
GOFLAGS=-trimpath GOBIN="$cache.partial" \
    go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
mv "$cache.partial/helm" "$cache/helm"
rmdir "$cache.partial" 2>/dev/null || true
echo "$cache/helm"

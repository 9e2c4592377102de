#!/usr/bin/env bash
# Build a Kubernetes control plane for kbatch's tests from Go modules.
#
# Produces, under ${KBATCH_K8S_CACHE:-$HOME/.cache/kbatch/k8s}/<key>/bin/:
#   kube-apiserver kube-controller-manager kube-scheduler kubectl  (k8s.io/kubernetes)
#   etcd                                                           (go.etcd.io/etcd/server/v3)
#   kwok                                                           (sigs.k8s.io/kwok/cmd/kwok)
#
# Idempotent: when the stamp file (written last) and every binary exist it
# prints the bin dir and exits at once. The last line on stdout is always the
# bin dir; progress goes to stderr. The Go module and build caches stay at
# their defaults (GOMODCACHE/GOCACHE) so a rebuild after a key change is fast.
#
# Environment:
#   KBATCH_K8S_CACHE       cache root (default $HOME/.cache/kbatch/k8s)
#   KBATCH_K8S_BUILD_JOBS  go build -p (default: number of CPUs, at most 2)
#   GO                     go binary (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail

K8S_VERSION=v1.33.13   # k8s.io/kubernetes; staging modules are v0.33.13
ETCD_VERSION=v3.5.21   # what k8s 1.33 pins in its go.mod
KWOK_VERSION=v0.7.0    # last release that ships default node/pod stages

BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)

key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
root="${KBATCH_K8S_CACHE:-${HOME}/.cache/kbatch/k8s}/${key}"
bin="${root}/bin"
stamp="${root}/.complete"

all_present() {
    [[ -f "${stamp}" ]] || return 1
    local b
    for b in "${BINARIES[@]}"; do
        [[ -x "${bin}/${b}" ]] || return 1
    done
}

# Fast path: nothing to do.
if all_present; then
    echo "${bin}"
    exit 0
fi

mkdir -p "${root}"
# Serialise concurrent builds of the same key (e.g. parallel test workers).
exec 9>"${root}/.lock"
flock 9
if all_present; then
    echo "${bin}"
    exit 0
fi

log() { echo "build.sh: $*" >&2; }

GO="${GO:-$(command -v go || true)}"
GO="${GO:-/usr/local/go/bin/go}"
[[ -x "${GO}" ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }

ncpu="$(nproc 2>/dev/null || echo 2)"
jobs="${KBATCH_K8S_BUILD_JOBS:-$(( ncpu < 2 ? ncpu : 2 ))}"

export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

start=$(date +%s)
log "building ${key} with $("${GO}" version) (-p ${jobs}) into ${bin}"

src="${root}/src"
stage="${root}/bin.partial"
rm -rf "${stage}"
mkdir -p "${src}/k8s" "${src}/etcd" "${src}/kwok" "${stage}"

gobuild() {
    # gobuild <module dir> <ldflags> <output: file, or dir ending in /> <packages...>
    local dir="$1" ldflags="$2" out="$3"
    shift 3
    (cd "${dir}" && "${GO}" build -trimpath -p "${jobs}" -ldflags "-s -w ${ldflags}" -o "${out}" "$@")
}

# --- Kubernetes ---------------------------------------------------------------
# k8s.io/kubernetes requires its staging modules (k8s.io/api, ...) at v0.0.0
# with replace lines to ./staging/src/...; replace lines of a dependency are
# ignored, so mirror each one as a replace to the published v0.MINOR.PATCH.
staging_version="v0.${K8S_VERSION#v1.}"
kgomod="$(cd "${src}" && GOFLAGS= "${GO}" mod download -json "k8s.io/kubernetes@${K8S_VERSION}" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "${kgomod}" ]] || { log "could not download k8s.io/kubernetes@${K8S_VERSION}"; exit 1; }
replaces="$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "${kgomod}")"
[[ -n "${replaces}" ]] || { log "found no staging replace lines in ${kgomod}"; exit 1; }

k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
{
    echo "module kbatch.test/k8sbuild"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes ${K8S_VERSION}"
    echo
    echo "replace ("
    for m in ${replaces}; do
        echo "	${m} => ${m} ${staging_version}"
    done
    echo ")"
    echo
    echo "tool ("
    for c in "${k8s_cmds[@]}"; do
        echo "	k8s.io/kubernetes/cmd/${c}"
    done
    echo ")"
} > "${src}/k8s/go.mod.new"
if ! cmp -s "${src}/k8s/go.mod.new" "${src}/k8s/go.mod.in" 2>/dev/null; then
    mv "${src}/k8s/go.mod.new" "${src}/k8s/go.mod.in"
    cp "${src}/k8s/go.mod.in" "${src}/k8s/go.mod"
    rm -f "${src}/k8s/go.sum"
    log "resolving k8s.io/kubernetes ${K8S_VERSION} dependencies ($(wc -w <<<"${replaces}") staging replaces)"
    (cd "${src}/k8s" && "${GO}" mod tidy)
else
    rm -f "${src}/k8s/go.mod.new"
fi

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
    k8s_ldflags+=" -X ${pkg}.gitMajor=1"
    k8s_ldflags+=" -X ${pkg}.gitMinor=${minor}"
    k8s_ldflags+=" -X ${pkg}.gitTreeState=clean"
done
t=$(date +%s)
log "go build ${k8s_cmds[*]}"
gobuild "${src}/k8s" "${k8s_ldflags}" "${stage}/" "${k8s_cmds[@]/#/k8s.io/kubernetes/cmd/}"
log "kubernetes commands built in $(( $(date +%s) - t ))s"

# --- etcd -----------------------------------------------------------------------
# go.etcd.io/etcd/server/v3 is the etcd main package; its go.mod has local
# replace lines, so it is built as a dependency of a module of our own.
if [[ ! -f "${src}/etcd/go.sum" ]] || ! grep -q "server/v3 ${ETCD_VERSION}" "${src}/etcd/go.mod" 2>/dev/null; then
    printf 'module kbatch.test/etcdbuild\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n\ntool go.etcd.io/etcd/server/v3\n' \
        "${ETCD_VERSION}" > "${src}/etcd/go.mod"
    rm -f "${src}/etcd/go.sum"
    (cd "${src}/etcd" && "${GO}" mod tidy)
fi
t=$(date +%s)
log "go build etcd"
gobuild "${src}/etcd" "" "${stage}/etcd" go.etcd.io/etcd/server/v3
log "etcd built in $(( $(date +%s) - t ))s"

# --- kwok -----------------------------------------------------------------------
if [[ ! -f "${src}/kwok/go.sum" ]] || ! grep -q "kwok ${KWOK_VERSION}" "${src}/kwok/go.mod" 2>/dev/null; then
    printf 'module kbatch.test/kwokbuild\n\ngo 1.24.0\n\nrequire sigs.k8s.io/kwok %s\n\ntool sigs.k8s.io/kwok/cmd/kwok\n' \
        "${KWOK_VERSION}" > "${src}/kwok/go.mod"
    rm -f "${src}/kwok/go.sum"
    (cd "${src}/kwok" && "${GO}" mod tidy)
fi
t=$(date +%s)
log "go build kwok"
gobuild "${src}/kwok" "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" "${stage}/kwok" sigs.k8s.io/kwok/cmd/kwok
log "kwok built in $(( $(date +%s) - t ))s"

# --- install ----------------------------------------------------------------------
for b in "${BINARIES[@]}"; do
    [[ -x "${stage}/${b}" ]] || { log "missing ${b} after build"; exit 1; }
done
rm -rf "${bin}"
mv "${stage}" "${bin}"
elapsed=$(( $(date +%s) - start ))
{
    echo "key=${key}"
    echo "go=$("${GO}" version)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "seconds=${elapsed}"
} > "${stamp}.tmp"
mv "${stamp}.tmp" "${stamp}"   # written last: marks the build complete
log "done in ${elapsed}s"
echo "${bin}"

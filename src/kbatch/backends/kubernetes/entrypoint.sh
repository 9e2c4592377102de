#!/bin/sh
# kbatch's entrypoint in a Kubernetes job's container: runs the job's script
# with its arguments, and copies its output to the output file (and its errors
# to the error file) when their directory exists, e.g. the user's home volume.
# The pod log always has the output too.  SIGTERM is passed on to the script.
set -u
script="$1"
shift
out="${KBATCH_OUTPUT:-}"
err="${KBATCH_ERROR:-}"

usable() { [ -n "$1" ] && [ -d "$(dirname "$1")" ] && touch "$1" 2>/dev/null; }

if ! usable "$out"; then
    exec "$script" "$@"
fi
if [ -n "$err" ] && ! usable "$err"; then
    err=""
fi
if [ "${KBATCH_OPEN_MODE:-truncate}" != append ]; then
    : >"$out"
    if [ -n "$err" ]; then : >"$err"; fi
fi
fifos=$(mktemp -d)
mkfifo "$fifos/out"
tee -a "$out" <"$fifos/out" &
if [ -n "$err" ]; then
    mkfifo "$fifos/err"
    tee -a "$err" <"$fifos/err" >&2 &
    "$script" "$@" >"$fifos/out" 2>"$fifos/err" &
else
    "$script" "$@" >"$fifos/out" 2>&1 &
fi
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
done
wait
rm -rf "$fifos"
exit "$rc"

#!/bin/sh
# kbatch's entrypoint in a Kubernetes job's container: runs the job's script
# with its arguments, and copies its output to the output file (and its errors
# to the error file) when their directory exists, e.g. the user's home volume.
# The pod log always has the output too.  SIGTERM is passed on to the script.
set -u
script="$1"
shift
# A task of an array (an Indexed Job): its line of the ConfigMap's "tasks" (line k for
# completion index k) holds its variables, quoted by the server: NAME='value' ...
tasks="${0%/*}/tasks"
if [ -n "${JOB_COMPLETION_INDEX:-}" ] && [ -f "$tasks" ]; then
    KBATCH_NL='
'
    KBATCH_CR=$(printf '\r')
    n=0
    found=""
    while IFS= read -r line || [ -n "$line" ]; do
        if [ "$n" = "$JOB_COMPLETION_INDEX" ]; then
            found=$line
            break
        fi
        n=$((n + 1))
    done <"$tasks"
    if [ -z "$found" ]; then
        echo "kbatch: no task for completion index $JOB_COMPLETION_INDEX" >&2
        exit 70
    fi
    eval "export $found"
    unset KBATCH_NL KBATCH_CR n found line
fi
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

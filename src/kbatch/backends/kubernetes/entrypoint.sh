#!/bin/sh
# kbatch's entrypoint in a Kubernetes job's container: runs the job's script
# with its arguments, and copies its output to the output file (and its errors
# to the error file) when their directory exists, e.g. the user's home volume.
# The pod log always has the output too.  SIGTERM is passed on to the script.
set -u
script="$1"
shift
# A task of an array (an Indexed Job): the ConfigMap's "array" holds what its tasks
# share, line k of its "tasks" (k: the completion index) the task's index and its row
# of a sweep as NAME='value' words, quoted by the server.
tasks="${0%/*}/tasks"
if [ -n "${JOB_COMPLETION_INDEX:-}" ] && [ -f "$tasks" ] && [ -f "${0%/*}/array" ]; then
    KBATCH_NL='
'
    KBATCH_CR=$(printf '\r')
    . "${0%/*}/array"
    n=0
    found=""
    while IFS= read -r line || [ -n "$line" ]; do
        if [ "$n" = "$JOB_COMPLETION_INDEX" ]; then
            found=$line
            break
        fi
        n=$((n + 1))
    done <"$tasks"
    task=${found%% *}
    case "$task" in
    '' | *[!0-9]*)
        echo "kbatch: no task for completion index $JOB_COMPLETION_INDEX" >&2
        exit 70
        ;;
    esac
    case "$found" in
    *" "*) eval "export ${found#* }" ;;
    esac
    # $1 with every $kbatch_mark replaced by the task's index
    with_index() {
        rest=$1
        acc=""
        while :; do
            case "$rest" in
            *"$kbatch_mark"*)
                acc="$acc${rest%%"$kbatch_mark"*}$task"
                rest=${rest#*"$kbatch_mark"}
                ;;
            *) break ;;
            esac
        done
        printf '%s' "$acc$rest"
    }
    if [ -n "$kbatch_output" ]; then
        KBATCH_OUTPUT=$(with_index "$kbatch_output")
        KBATCH_ERROR=""
        if [ -n "$kbatch_error" ]; then KBATCH_ERROR=$(with_index "$kbatch_error"); fi
        export KBATCH_OUTPUT KBATCH_ERROR
    fi
    export SLURM_ARRAY_TASK_ID="$task" KBATCH_ARRAY_TASK_ID="$task"
    export SLURM_JOB_ID="${kbatch_array_id}_$task" SLURM_JOBID="${kbatch_array_id}_$task"
    export KBATCH_JOB_ID="${kbatch_array_id}_$task"
    unset KBATCH_NL KBATCH_CR n found line rest acc task
    unset kbatch_array_id kbatch_mark kbatch_output kbatch_error
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

# The runner agent: the only long-lived process inside an isolated runner.
#
# The server starts a runner (a bubblewrap sandbox) before any request needs it, so isolation
# costs no latency; this loop then waits for commands. It is plain bash because the server's
# Python may live where the sandbox user cannot read it.
#
# Arguments: six file descriptors set up by the server, then the rlimits to apply.
#   ctl     commands in: NUL-separated records: N, N "NAME=value" entries, the command;
#           "Ng" instead of N: run this command in a process group of its own (a stop of a
#           streamed run sends Ctrl-C to that group; setsid costs an exec, so only then)
#   out err the commands' stdout and stderr
#   status  "ready" once, then the exit code of each command, one per line
#   extra   a descriptor bubblewrap no longer needs (the working directory), closed here
#   input   the commands' stdin: a pipe the server closes at once (execute/) or feeds with
#           what a streaming client types (execute/stream/)
#   cpu (s), file size (KiB), open files, processes ("" when a pids cgroup counts them)
set +m
ctl=$1 out=$2 err=$3 status=$4 extra=$5 input=$6
shift 6
exec {extra}<&- 0</dev/null
ulimit -c 0 -t "$1" -f "$2" -n "$3" || exit 97
if [ -n "$4" ]; then ulimit -u "$4" || exit 97; fi
# A command asked for with "g" leads a process group of its own, so that a stop (Ctrl-C)
# reaches all of it at once, processes it is forking included; -w: setsid's own fork, if any,
# is waited for.
launch=()
if [ -x /usr/bin/setsid ]; then launch=(/usr/bin/setsid -w); fi
printf 'ready\n' >&"$status"
while IFS= read -r -d '' -u "$ctl" count; do
    group=()
    if [ "${count%g}" != "$count" ]; then
        count=${count%g}
        group=("${launch[@]}")
    fi
    vars=()
    for ((i = 0; i < count; i++)); do
        IFS= read -r -d '' -u "$ctl" entry || exit 0
        vars+=("$entry")
    done
    IFS= read -r -d '' -u "$ctl" command || exit 0
    "${group[@]}" /usr/bin/env -i "${vars[@]}" /bin/bash -c "$command" \
        <&"$input" >&"$out" 2>&"$err" \
        {ctl}<&- {out}>&- {err}>&- {status}>&- {input}<&-
    code=$?
    # Nothing a command started outlives it: daemons, setsid and stopped processes included.
    # The runner has its own PID namespace, so -1 reaches only this sandbox.
    kill -KILL -1 2>/dev/null
    printf '%d\n' "$code" >&"$status"
done

# The runner agent: the only long-lived process inside an isolated runner.
#
# The server starts a runner (a bubblewrap sandbox) before any request needs it, so isolation
# costs no latency; this loop then waits for commands. It is plain bash because the server's
# Python may live where the sandbox user cannot read it.
#
# Arguments: five file descriptors set up by the server, then the rlimits to apply.
#   ctl     commands in: NUL-separated records: N, N "NAME=value" entries, the command
#   out err the commands' stdout and stderr
#   status  "ready" once, then the exit code of each command, one per line
#   extra   a descriptor bubblewrap no longer needs (the working directory), closed here
#   cpu (s), file size (KiB), open files, processes ("" when a pids cgroup counts them)
set +m
ctl=$1 out=$2 err=$3 status=$4 extra=$5
exec {extra}<&- 0</dev/null
ulimit -c 0 -t "$6" -f "$7" -n "$8" || exit 97
if [ -n "$9" ]; then ulimit -u "$9" || exit 97; fi
printf 'ready\n' >&"$status"
while IFS= read -r -d '' -u "$ctl" count; do
    vars=()
    for ((i = 0; i < count; i++)); do
        IFS= read -r -d '' -u "$ctl" entry || exit 0
        vars+=("$entry")
    done
    IFS= read -r -d '' -u "$ctl" command || exit 0
    /usr/bin/env -i "${vars[@]}" /bin/bash -c "$command" </dev/null >&"$out" 2>&"$err" \
        {ctl}<&- {out}>&- {err}>&- {status}>&-
    code=$?
    # Nothing a command started outlives it: daemons, setsid and stopped processes included.
    # The runner has its own PID namespace, so -1 reaches only this sandbox.
    kill -KILL -1 2>/dev/null
    printf '%d\n' "$code" >&"$status"
done

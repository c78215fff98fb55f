#!/bin/bash
# The image's entrypoint: make this container's own cgroups writable, then drop CAP_SYS_ADMIN
# for good and start `sandbox-kernel "$@"` (serve or worker).
#
# Why: Docker mounts /sys/fs/cgroup read-only, so the server could not create the per-run
# cgroups that cap a run's processes and memory. With CAP_SYS_ADMIN (granted to the container
# for this script only) it remounts the container's own memory and pids controllers read-write;
# those mounts are the container's own cgroup, never the host's hierarchy. The capability is
# then removed from the bounding and inheritable sets before exec, so neither the server nor
# anything it starts can get it back. Without CAP_SYS_ADMIN (a cluster's front needs none)
# nothing is prepared.
set -euo pipefail

log() { printf 'sandbox-kernel-entrypoint: %s\n' "$*" >&2; }

# True when a cgroup directory accepts a new group (a read-only mount refuses with EROFS).
writable() {
    local probe="$1/sandbox-kernel-entrypoint-probe-$$"
    mkdir "$probe" 2>/dev/null && rmdir "$probe"
}

make_writable() {
    local mount_point="$1"
    writable "$mount_point" && return 0
    if mount -o remount,bind,rw "$mount_point" "$mount_point" 2>/dev/null && writable "$mount_point"; then
        log "made $mount_point writable"
    else
        log "$mount_point stays read-only (could not remount it): runs are capped by rlimits only"
        return 1
    fi
}

if (( ((0x$(awk '/^CapEff:/ { print $2 }' /proc/self/status) >> 21) & 1) == 0 )); then
    # No CAP_SYS_ADMIN (21): nothing to prepare, nothing to drop. Right for a cluster's front,
    # which runs no command; a worker or a single server then has rlimits but no cgroups, and
    # bubblewrap needs /proc unmasked (--security-opt systempaths=unconfined).
    log "no CAP_SYS_ADMIN: cgroups and /proc left as Docker made them"
    exec sandbox-kernel "$@"
fi

if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
    # cgroup v2 (unified): the container's cgroup namespace root. A cgroup with processes
    # cannot hand controllers to children, so this process moves to a leaf first.
    if make_writable /sys/fs/cgroup; then
        mkdir -p /sys/fs/cgroup/sandbox-kernel-init
        echo $$ > /sys/fs/cgroup/sandbox-kernel-init/cgroup.procs
        echo "+pids +memory" > /sys/fs/cgroup/cgroup.subtree_control \
            || log "could not enable the pids and memory controllers for per-run cgroups"
    fi
else
    # cgroup v1: one mount per controller; only these two are used.
    for controller in memory pids; do
        [ -d "/sys/fs/cgroup/$controller" ] && make_writable "/sys/fs/cgroup/$controller" || true
    done
fi

# bubblewrap mounts a new /proc in each sandbox, which the kernel allows only when nothing of
# the container's /proc is hidden: Docker's masked and read-only paths (/proc/kcore,
# /proc/sys...) are mounts over it. `--security-opt systempaths=unconfined` leaves them out;
# docker-compose 1.29 cannot say that, so they are unmounted here (deepest first), which needs
# CAP_SYS_ADMIN too. Either way this container's root may then write /proc/sys: the server is
# the only process running as root here, and commands run as nobody in their own namespaces.
unmask_proc() {
    local hidden
    hidden=$(awk '$5 ~ "^/proc/" { print $5 }' /proc/self/mountinfo | sort -r)
    [ -n "$hidden" ] || return 0
    if printf '%s\n' "$hidden" | xargs -r umount 2>/dev/null; then
        log "unmasked /proc (the container's masked paths) for bubblewrap's own /proc mounts"
    else
        log "could not unmask /proc: bubblewrap will fail to mount /proc" \
            "(run the container with --security-opt systempaths=unconfined)"
    fi
}
unmask_proc

# Dropped from the bounding set, CAP_SYS_ADMIN cannot come back through any later exec; from
# the inheritable (and so the ambient) set, no child inherits it.
exec setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin -- sandbox-kernel "$@"

"""The server's parent cgroup is named uniquely on the host, and the stale-cgroup sweep removes
only crashed servers' groups of its own pid namespace (issue 15: containerised servers are all
pid 1 and may share a cgroup hierarchy; keyed by pid, one's sweep removed the others' groups).

Real cgroups: the test creates groups as the server does, so it needs root and a writable
cgroup hierarchy, and fails saying so otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.server import cgroups
from sandbox_kernel.server.cgroups import server_group_name, sweep_stale


@pytest.fixture
def hierarchy() -> Iterator[Path]:
    """Where the server would create its groups (v1 ``pids``, else the v2 root)."""
    root = cgroups.CGROUP_ROOT / "pids"
    if not (root / "cgroup.procs").exists():
        root = cgroups.CGROUP_ROOT
    probe = root / "sandbox-kernel-test-probe"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        pytest.fail(f"these tests create cgroups under {root} and cannot ({error}): run as root")
    yield root


def _child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_name_holds_namespace_pid_and_start_time() -> None:
    name = server_group_name()
    namespace, pid, started = name.removeprefix("sandbox-kernel-").split("-")
    assert int(namespace) == os.stat("/proc/self/ns/pid").st_ino
    assert int(pid) == os.getpid()
    assert int(started) > 0
    assert server_group_name() == name, "the name must be stable for the server's lifetime"
    child = _child()
    try:
        assert server_group_name(child.pid) != name
    finally:
        child.kill()
        child.wait()
    with pytest.raises(OSError, match="gone"):
        server_group_name(child.pid)


def test_the_sweep_removes_crashed_servers_groups_of_this_namespace_only(hierarchy: Path) -> None:
    namespace = os.stat("/proc/self/ns/pid").st_ino
    live = _child()
    dead = _child()
    dead_name = server_group_name(dead.pid)
    dead.kill()
    dead.wait()
    live_name = server_group_name(live.pid)
    started = int(live_name.rsplit("-", 1)[1])
    groups = {
        "live": hierarchy / live_name,
        "crashed": hierarchy / dead_name,
        # the pid was reused by a process started later: its server is gone
        "reused pid": hierarchy / f"sandbox-kernel-{namespace}-{live.pid}-{started - 1}",
        # another container's server (another pid namespace): not ours to judge
        "other namespace": hierarchy / f"sandbox-kernel-{namespace + 1}-{dead.pid}-{started}",
        # a bare pid (pre-issue-15 name): ambiguous across namespaces, left alone
        "bare pid": hierarchy / "sandbox-kernel-1",
    }
    try:
        for group in groups.values():
            group.mkdir(exist_ok=True)
        (groups["crashed"] / "run-1").mkdir()  # a runner's group under the crashed server's
        sweep_stale()
        left = {what for what, group in groups.items() if group.exists()}
        assert left == {"live", "other namespace", "bare pid"}
    finally:
        live.kill()
        live.wait()
        for group in groups.values():
            for child in group.glob("*/") if group.exists() else []:
                child.rmdir()
            if group.exists():
                group.rmdir()

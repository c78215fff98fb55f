"""Per-run control groups: a process cap (a fork bomb must not exhaust the host's PIDs) and a
memory cap (a memory cgroup, not ``RLIMIT_AS``, which breaks the JVM).

Both cgroup generations are handled: v1 (one hierarchy per controller, as on this project's
machines) and v2 (one unified hierarchy, where the controllers must be enabled in the parent's
``cgroup.subtree_control``). Creating cgroups needs root or a delegated subtree; when it is not
possible the server says so and falls back to rlimits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PREFIX = "sandbox-kernel-"
#: cpu.shares (v1) and cpu.weight (v2) of every user's group (their defaults): equal, whatever
#: their numbers of processes.
_EQUAL_SHARE = 1024
_EQUAL_WEIGHT = 100


@dataclasses.dataclass(frozen=True)
class MemoryKills:
    """A reading of a cgroup's memory-kill counter (see :meth:`RunCgroup.memory_kills`)."""

    count: int
    #: False: ``count`` is how often the cap was hit (old v1 kernels), not kills.
    exact: bool


class RunCgroup:
    """The cgroup(s) of one runner: join them, kill everything in them, remove them."""

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories

    @property
    def procs_files(self) -> list[Path]:
        return [directory / "cgroup.procs" for directory in self.directories]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in procs.read_text().split())
        return found

    def kill(self, deadline: float = 2.0) -> None:
        """SIGKILL every member until none is left (a forking process may add new ones)."""
        for directory in self.directories:
            with contextlib.suppress(OSError):
                (directory / "cgroup.kill").write_text("1")
        end = time.monotonic() + deadline
        while (pids := self.pids()) and time.monotonic() < end:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def memory_kills(self) -> MemoryKills:
        """How often the kernel has killed a member for exceeding the memory cap so far.

        Read before and after each command: the counter moving is the only sure sign that
        a SIGKILL (exit status 137) was the memory cap's and not someone's ``kill -9``. It is
        ``oom_kill`` in ``memory.events`` (v2) or ``memory.oom_control`` (v1, Linux 4.13+);
        an older v1 kernel only counts how often the cap was hit (``memory.failcnt``), which
        reclaiming page cache also does, so that count is marked inexact.
        """
        failures = None
        for directory in self.directories:
            for name in ("memory.events", "memory.oom_control"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for line in (directory / name).read_text().splitlines():
                        if line.startswith("oom_kill "):
                            return MemoryKills(int(line.split()[1]), exact=True)
            with contextlib.suppress(OSError, ValueError):
                failures = int((directory / "memory.failcnt").read_text())
        return MemoryKills(failures or 0, exact=failures is None)

    def remove(self) -> None:
        for directory in self.directories:
            _rmdir_when_empty(directory)


class Cgroups:
    """Creates a cgroup per runner under one parent per server process."""

    def __init__(self, parents: list[Path], version: int) -> None:
        self.parents = parents
        self.version = version

    @classmethod
    def probe(cls, max_processes: int, memory_limit: int) -> Cgroups | None:
        """Cgroups this process may create, checked by really creating a test group."""
        name = server_group_name()
        sweep_stale()
        for candidate in (cls._v1(name), cls._v2(name)):
            if candidate is None:
                continue
            try:
                test = candidate.create("probe", max_processes, memory_limit)
            except OSError as error:
                log.info("cgroups v%d unusable: %s", candidate.version, error)
                candidate.remove()
                continue
            test.remove()
            return candidate
        return None

    @classmethod
    def _v1(cls, name: str) -> Cgroups | None:
        pids, memory = CGROUP_ROOT / "pids", CGROUP_ROOT / "memory"
        if not (pids / "cgroup.procs").exists() or not (memory / "cgroup.procs").exists():
            return None
        try:
            for controller in (pids, memory):
                (controller / name).mkdir(exist_ok=True)
        except OSError:
            return None
        return cls([pids / name, memory / name], version=1)

    @classmethod
    def _v2(cls, name: str) -> Cgroups | None:
        root = CGROUP_ROOT
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError:
            return None
        if not {"pids", "memory"} <= set(controllers):
            return None
        try:
            (root / "cgroup.subtree_control").write_text("+pids +memory")
            (root / name).mkdir(exist_ok=True)
            (root / name / "cgroup.subtree_control").write_text("+pids +memory")
        except OSError:
            return None
        return cls([root / name], version=2)

    def create(self, run_name: str, max_processes: int, memory_limit: int) -> RunCgroup:
        directories = [parent / run_name for parent in self.parents]
        for directory in directories:
            directory.mkdir(exist_ok=True)
        run = RunCgroup(directories)
        try:
            self._limit(directories, max_processes, memory_limit)
        except OSError:
            run.remove()
            raise
        return run

    def _limit(self, directories: list[Path], max_processes: int, memory: int) -> None:
        if self.version == 2:
            (directories[0] / "pids.max").write_text(str(max_processes))
            (directories[0] / "memory.max").write_text(str(memory))
            with contextlib.suppress(OSError):
                (directories[0] / "memory.swap.max").write_text("0")
            return
        pids, mem = directories
        (pids / "pids.max").write_text(str(max_processes))
        (mem / "memory.limit_in_bytes").write_text(str(memory))
        with contextlib.suppress(OSError):  # absent when swap accounting is off
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory))

    def remove(self) -> None:
        for parent in self.parents:
            for child in parent.glob("*/"):
                if child.is_dir():
                    RunCgroup([child]).kill(deadline=0.5)
                    _rmdir_when_empty(child)
            _rmdir_when_empty(parent)

    def describe(self) -> str:
        return f"cgroup v{self.version} (pids, memory)"


class UserCpuShares:
    """Each JupyterHub user's runs in one cpu cgroup, all of equal weight (issue 16): the
    kernel's scheduler then shares the CPU between users, not between processes, so a user
    with 20 busy loops gets what a user with one gets.

    cgroup v1: a ``cpu`` hierarchy of its own; a run's processes move to the user's group at
    the run's start and keep their pids and memory groups. cgroup v2: a process has one group
    for every controller, so the run's group itself moves under the user's group (made with
    the same limits, the processes moved into it, the old one removed); what the idle sandbox
    had charged to memory stays with the old group, which is gone.
    """

    def __init__(self, parent: Path, version: int) -> None:
        self.parent = parent
        self.version = version

    @classmethod
    def probe(cls, cgroups: Cgroups) -> UserCpuShares | None:
        """Per-user groups beside (v1) or under (v2) the server's run groups, if the cpu
        controller can be used; None otherwise (runs then share the server's CPU)."""
        try:
            if cgroups.version == 1:
                root = CGROUP_ROOT / "cpu"
                if not (root / "cpu.shares").exists():
                    return None
                parent = root / server_group_name()
                parent.mkdir(exist_ok=True)
                return cls(parent, 1)
            [parent] = cgroups.parents
            if "cpu" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
                return None
            (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu")
            (parent / "cgroup.subtree_control").write_text("+cpu")
            return cls(parent, 2)
        except OSError as error:
            log.info("per-user CPU shares unusable: %s", error)
            return None

    def join(self, user: str, run: RunCgroup) -> None:
        """Put a run (its idle sandbox, before the command starts) in ``user``'s group."""
        group = self.parent / f"user-{hashlib.sha256(user.encode()).hexdigest()[:16]}"
        if self.version == 1:
            group.mkdir(exist_ok=True)
            (group / "cpu.shares").write_text(str(_EQUAL_SHARE))
            _move(run.pids(), group)
            return
        if not group.is_dir():
            group.mkdir()
            (group / "cpu.weight").write_text(str(_EQUAL_WEIGHT))
            (group / "cgroup.subtree_control").write_text("+cpu +pids +memory")
        [old] = run.directories
        new = group / old.name
        new.mkdir()
        for limit in ("pids.max", "memory.max", "memory.swap.max"):
            with contextlib.suppress(OSError):
                (new / limit).write_text((old / limit).read_text())
        _move(run.pids(), new)
        run.directories = [new]
        _rmdir_when_empty(old)

    def remove(self) -> None:
        for group in self.parent.glob("user-*/"):
            for run in group.glob("*/"):  # v2: runs left by a killed request
                RunCgroup([run]).kill(deadline=0.5)
                _rmdir_when_empty(run)
            RunCgroup([group]).kill(deadline=0.5)
            _rmdir_when_empty(group)
        if self.version == 1:
            _rmdir_when_empty(self.parent)


def _move(pids: set[int], group: Path) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            (group / "cgroup.procs").write_text(str(pid))


def server_group_name(pid: int | None = None) -> str:
    """The name of a server process's parent cgroup, unique on the host: the pid alone is not,
    since every containerised server is pid 1 of its own namespace (issue 15). The pid
    namespace's inode and the process's start time make it so; :func:`sweep_stale` reads them
    back to tell a live server's groups from a crashed one's."""
    pid = os.getpid() if pid is None else pid
    identity = _process_identity(pid)
    if identity is None:
        raise OSError(f"cannot read /proc/{pid}: the process is gone")
    namespace, started = identity
    return f"{_PREFIX}{namespace}-{pid}-{started}"


def _process_identity(pid: int) -> tuple[int, int] | None:
    """(pid namespace inode, start time in clock ticks since boot) of ``pid`` as this process
    sees it, or None if it has no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields follow its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return namespace, int(fields[19])  # field 22 of proc(5): starttime


def sweep_stale() -> None:
    """Remove the cgroups of server processes that no longer exist (after a crash).

    Only groups of this pid namespace are judged: a pid of another namespace (another
    container's server sharing the hierarchy) means nothing here, so its groups are left
    alone. A group is stale when its pid is gone or now belongs to a process started later.
    """
    own_namespace = os.stat("/proc/self/ns/pid").st_ino
    for root in (CGROUP_ROOT / "pids", CGROUP_ROOT / "memory", CGROUP_ROOT / "cpu", CGROUP_ROOT):
        with contextlib.suppress(OSError):
            for parent in root.glob(f"{_PREFIX}*"):
                if _is_stale(parent.name.removeprefix(_PREFIX), own_namespace):
                    Cgroups([parent], version=1).remove()


def _is_stale(key: str, own_namespace: int) -> bool:
    parts = key.split("-")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return False  # not a name this version makes (nor an older version's bare pid)
    namespace, pid, started = (int(part) for part in parts)
    if namespace != own_namespace:
        return False
    return _process_identity(pid) != (namespace, started)


def _rmdir_when_empty(directory: Path) -> None:
    for _ in range(50):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY:
                log.debug("cannot remove %s: %s", directory, error)
                return
            time.sleep(0.002)
    log.warning("cgroup %s still busy; it will be removed at next start", directory)

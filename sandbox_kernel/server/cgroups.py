"""Per-run control groups: a process cap (a fork bomb must not exhaust the host's PIDs) and a
memory cap (a memory cgroup, not ``RLIMIT_AS``, which breaks the JVM).

Both cgroup generations are handled: v1 (one hierarchy per controller, as on this project's
machines) and v2 (one unified hierarchy, where the controllers must be enabled in the parent's
``cgroup.subtree_control``). Creating cgroups needs root or a delegated subtree; when it is not
possible the server says so and falls back to rlimits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PREFIX = "sandbox-kernel-"


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

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a member for exceeding the memory cap."""
        for directory in self.directories:
            for name, key in (("memory.oom_control", "oom_kill "), ("memory.events", "oom_kill ")):
                with contextlib.suppress(OSError):
                    for line in (directory / name).read_text().splitlines():
                        if line.startswith(key) and int(line.split()[1]) > 0:
                            return True
        return False

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
        name = f"{_PREFIX}{os.getpid()}"
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


def sweep_stale() -> None:
    """Remove the cgroups of server processes that no longer exist (after a crash)."""
    for root in (CGROUP_ROOT / "pids", CGROUP_ROOT / "memory", CGROUP_ROOT):
        with contextlib.suppress(OSError):
            for parent in root.glob(f"{_PREFIX}*"):
                pid = parent.name.removeprefix(_PREFIX)
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    Cgroups([parent], version=1).remove()


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

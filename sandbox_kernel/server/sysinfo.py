"""``specifications/`` and ``usages/``: what the host is, and how loaded it is now.

The public server samples ``usages/`` for 2 seconds inside the request; here a background task
samples every second and the endpoint answers at once with the latest sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from .. import __version__, protocol
from .runners import Isolation
from .settings import ServerSettings

#: Shown as ``host.sandbox_version``: the protocol generation we speak, then who we are.
SANDBOX_VERSION = f"3.0.3+sandbox-kernel.{__version__}"


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * 1024
    return values


def _device_of(path: Path) -> str:
    """The device holding ``path`` (the longest matching mount point)."""
    best, device = "", "unknown"
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            point = fields[1]
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(
                best
            ):
                best, device = point, fields[0]
    return device


def _cpu_frequencies() -> tuple[float | None, float | None]:
    base = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    try:
        low = int((base / "cpuinfo_min_freq").read_text()) / 1000
        high = int((base / "cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        return None, None
    return low, high


def _physical_cores() -> int | None:
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = (part.strip() for part in line.partition(":"))
            if name == "physical id":
                physical = value
            elif name == "core id":
                core = value
                cores.add((physical, core))
    return len(cores) or os.cpu_count()


#: The protocol extensions this server speaks (docs/protocol-extensions.md).
EXTENSIONS = (protocol.EXTENSION_STREAM, protocol.EXTENSION_STDIN, protocol.EXTENSION_CAUSES)


def specifications(
    settings: ServerSettings, isolation: Isolation, data_dir: Path, server_id: str
) -> dict[str, Any]:
    """The 3.x shape, plus ``container.execute_timeout``, ``expiration`` and ``isolation``,
    and the top-level ``extensions`` and ``server_id``."""
    memory = _meminfo()
    device = _device_of(data_dir)
    disk = os.statvfs(data_dir)
    freq_min, freq_max = _cpu_frequencies()
    limited = isolation.cgroups is not None
    return {
        "host": {
            "cpu": {
                "core": _physical_cores(),
                "logical": os.cpu_count(),
                "freq_min": freq_min,
                "freq_max": freq_max,
            },
            "memory": {
                "ram": memory.get("MemTotal"),
                "swap": memory.get("SwapTotal"),
                "storage": {device: disk.f_blocks * disk.f_frsize},
            },
            "docker_version": None,
            "sandbox_version": SANDBOX_VERSION,
        },
        "container": {
            "count": settings.workers,
            "cpu": {
                "count": os.cpu_count(),
                "period": None,
                "shares": None,
                "quota": None,
                "time_limit": settings.cpu_limit,
            },
            "memory": {
                "ram": settings.memory_limit if limited else -1,
                "swap": 0 if limited else -1,
                "storage": settings.workdir_quota,
            },
            "io": {"read_iops": {}, "read_bps": {}, "write_iops": {}, "write_bps": {}},
            "process": settings.max_processes,
            "working_dir_device": device,
            "execute_timeout": settings.execute_timeout,
            "expiration": settings.expiration,
            "isolation": isolation.describe(),
        },
        "extensions": [*EXTENSIONS, *([protocol.EXTENSION_USERS] if settings.hub_auth else [])],
        "server_id": server_id,
    }


class UsageSampler:
    """Samples the host every ``interval`` seconds; ``current(busy)`` answers at once."""

    def __init__(self, data_dir: Path, interval: float = 1.0) -> None:
        self.data_dir = data_dir
        self.interval = interval
        self.device = _device_of(data_dir)
        self._cpu = self._read_cpu()
        self._io = self._read_io()
        self._net = self._read_net()
        self._at = time.monotonic()
        self.sample: dict[str, Any] = self._measure()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample = await asyncio.to_thread(self._measure)

    def current(self, busy: int) -> dict[str, Any]:
        return {**self.sample, "container": busy}

    @staticmethod
    def _read_cpu() -> tuple[int, int]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            return sum(fields), idle
        return 0, 0

    def _read_io(self) -> tuple[int, int, int, int]:
        """Reads, sectors read, writes, sectors written of the data dir's device."""
        name = os.path.basename(self.device)
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/diskstats").read_text().splitlines():
                fields = line.split()
                if fields[2] == name:
                    return int(fields[3]), int(fields[5]), int(fields[7]), int(fields[9])
        return 0, 0, 0, 0

    @staticmethod
    def _read_net() -> tuple[int, int, int, int]:
        sent = received = sent_packets = received_packets = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
                name, _, data = line.partition(":")
                if name.strip() == "lo":
                    continue
                fields = [int(v) for v in data.split()]
                received, received_packets = received + fields[0], received_packets + fields[1]
                sent, sent_packets = sent + fields[8], sent_packets + fields[9]
        return sent, received, sent_packets, received_packets

    def _measure(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = max(now - self._at, 1e-3)
        cpu, io, net = self._read_cpu(), self._read_io(), self._read_net()
        total, idle = cpu[0] - self._cpu[0], cpu[1] - self._cpu[1]
        usage = 1 - idle / total if total > 0 else 0.0
        deltas = [max(0, new - old) for new, old in zip(io, self._io, strict=True)]
        self._cpu, self._io, self._at = cpu, io, now
        net_delta = [max(0, new - old) for new, old in zip(net, self._net, strict=True)]
        self._net = net
        memory = _meminfo()
        disk = os.statvfs(self.data_dir)
        ncpu = os.cpu_count() or 1
        frequency = _current_frequency()
        return {
            "cpu": {
                "frequency": frequency,
                "usage": round(usage, 4),
                "usage_avg": [round(load / ncpu, 4) for load in os.getloadavg()],
            },
            "memory": {
                "ram": memory.get("MemTotal", 0) - memory.get("MemAvailable", 0),
                "swap": memory.get("SwapTotal", 0) - memory.get("SwapFree", 0),
                "storage": {self.device: (disk.f_blocks - disk.f_bfree) * disk.f_frsize},
            },
            "io": {
                "read_iops": {self.device: round(deltas[0] / elapsed, 2)},
                "read_bps": {self.device: round(deltas[1] * 512 / elapsed, 2)},
                "write_iops": {self.device: round(deltas[2] / elapsed, 2)},
                "write_bps": {self.device: round(deltas[3] * 512 / elapsed, 2)},
            },
            "network": {
                "sent_bytes": net_delta[0],
                "received_bytes": net_delta[1],
                "sent_packets": net_delta[2],
                "received_packets": net_delta[3],
            },
            "process": sum(1 for entry in os.listdir("/proc") if entry.isdigit()),
        }


def _current_frequency() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").read_text()) / 1000
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    return None

"""Load: many kernels at once against one embedded server with fewer slots than kernels.

8 kernels run 200 cells each, all at the same time, against one server with 4 execution
slots (the kernels retry the 503s a full server answers). Every cell writes a file and prints
a token that names its kernel and cell; afterwards every output must have reached the right
kernel and cell exactly once, every environment must hold exactly the files its cells wrote,
nothing a cell started and no working directory may be left, and the server's memory must not
grow across the run. The figures (time, throughput, 503s, latency, memory) are printed: run
with ``-s`` to see them.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox_kernel.client import Sandbox

from ..conftest import Cell, KernelSession, Server, descendants, processes_matching, wait_until
from ..helpers import living

StartKernel = Callable[..., KernelSession]
StartServer = Callable[..., Server]

KERNELS = 8
CELLS = 200
WORKERS = 4  # execution slots: fewer than kernels, so cells queue and some get 503s
WARM_UP = 3  # cells per kernel before the memory baseline
CHECK_EVERY = 20  # these cells also print the shell counter carried from cell to cell
BACKGROUND_EVERY = 25  # these cells also leave a background process behind
PROCESSES_PER_RUNNER = 3  # an idle prestarted runner: bwrap, its child bwrap, the agent
RSS_GROWTH_LIMIT_KB = 50 * 1024
RUN_LIMIT_SECONDS = 300.0
STATE_DIR = ".sandbox_kernel/"  # the kernel's own state inside every environment
MARK = f"{7000 + os.getpid() % 1000}.4{os.getpid() % 997:03d}"  # `sleep MARK` of the cells


def file_name(k: int, i: int) -> str:
    return f"f-{k}-{i:03d}"


def file_text(k: int, i: int) -> str:
    return f"k{k}-c{i}\n"


def cell_code(k: int, i: int) -> str:
    code = f'echo "k{k}-c{i}" > {file_name(k, i)}; n=$((n+1)); echo "out k{k} c{i}"'
    if i % CHECK_EVERY == 0:
        code += '\necho "n=$n"'
    if i % BACKGROUND_EVERY == 0:
        code += f"\nsleep {MARK} >/dev/null 2>&1 &"
    return code


def expected_stdout(k: int, i: int) -> str:
    text = f"out k{k} c{i}\n"
    if i % CHECK_EVERY == 0:
        text += f"n={i}\n"
    return text


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def busy_waits(cell: Cell) -> int:
    """503s the kernel waited through for this cell (one busy line update per retry)."""
    shown = cell.of_type("display_data") + cell.of_type("update_display_data")
    return sum("sandbox busy" in m["data"].get("text/plain", "") for m in shown)


def runner_processes(pid: int) -> list[str]:
    """Command lines of the server's descendants, shortened to what tells them apart."""
    lines = []
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        head = argv[0].decode(errors="replace")
        if head.endswith("bash") and any(b"runner agent" in arg for arg in argv):
            head = "agent"
        lines.append(head)
    return sorted(lines)


class Driver(threading.Thread):
    """Runs one kernel's cells: this thread alone touches that kernel's client."""

    def __init__(self, k: int, kernel: KernelSession, start: threading.Barrier) -> None:
        super().__init__(name=f"kernel-{k}", daemon=True)
        self.k = k
        self.kernel = kernel
        self.barrier = start
        self.cells: list[Cell] = []
        self.listing = ""
        self.status_text = ""
        self.error: str | None = None
        self.seconds = 0.0

    def run(self) -> None:
        try:
            self.barrier.wait(60)
            started = time.monotonic()
            for i in range(1, CELLS + 1):
                self.cells.append(self.kernel.run(cell_code(self.k, i), timeout=120))
            self.seconds = time.monotonic() - started
            listing = self.kernel.run(
                "ls -A | grep -v '^f-' ; ls f-* | wc -l; ls f-* | md5sum; cat f-* | md5sum"
            )
            self.listing = listing.stdout
            [status] = self.kernel.run("%sandbox_status").of_type("display_data")
            self.status_text = status["data"]["text/plain"]
        except BaseException:
            self.error = traceback.format_exc()


def status_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line[len(name) :].strip()
    raise AssertionError(f"no {name!r} in %sandbox_status:\n{text}")


@pytest.mark.timeout(600)
def test_many_kernels_share_a_small_server(
    start_server: StartServer, start_kernel: StartKernel
) -> None:
    began = time.monotonic()
    server = start_server("--workers", str(WORKERS))
    pid = server.pid
    kernels = [start_kernel(server) for _ in range(KERNELS)]
    print(f"\n{KERNELS} kernels started in {time.monotonic() - began:.1f} s")

    for kernel in kernels:  # warm-up: the server's caches and pools reach their size
        for _ in range(WARM_UP):
            warm = kernel.run("n=0; echo warm")
            assert (warm.status, warm.stdout) == ("ok", "warm\n"), warm.reply
    workdirs = server.work_area
    idle = sorted(["agent", "bwrap", "bwrap"] * WORKERS)
    assert wait_until(lambda: runner_processes(pid) == idle, 10), runner_processes(pid)
    rss_before = rss_kb(pid)
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.25):
            samples.append(rss_kb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    barrier = threading.Barrier(KERNELS + 1)
    drivers = [Driver(k, kernel, barrier) for k, kernel in enumerate(kernels)]
    for driver in drivers:
        driver.start()
    sampler.start()
    barrier.wait(60)
    started = time.monotonic()
    for driver in drivers:
        driver.join(max(1.0, RUN_LIMIT_SECONDS - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join()
    stuck = [driver.name for driver in drivers if driver.is_alive()]
    assert not stuck, f"still running after {RUN_LIMIT_SECONDS:.0f} s: {stuck}"
    errors = [f"{driver.name}:\n{driver.error}" for driver in drivers if driver.error]
    assert not errors, "\n".join(errors)

    # -- the figures ------------------------------------------------------------------------
    cells = [cell for driver in drivers for cell in driver.cells]
    latencies = sorted(cell.seconds for cell in cells)
    retried = [busy_waits(cell) for cell in cells]
    early = statistics.median(cell.seconds for d in drivers for cell in d.cells[:20])
    late = statistics.median(cell.seconds for d in drivers for cell in d.cells[-20:])
    assert wait_until(lambda: runner_processes(pid) == idle, 15), runner_processes(pid)
    rss_after = rss_kb(pid)
    print(
        f"{len(cells)} cells ({KERNELS} kernels x {CELLS}, {WORKERS} slots) in {elapsed:.1f} s: "
        f"{len(cells) / elapsed:.1f} cells/s\n"
        f"cell latency: median {statistics.median(latencies) * 1000:.0f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; median of cells 1-20 {early * 1000:.0f} ms, "
        f"of cells {CELLS - 19}-{CELLS} {late * 1000:.0f} ms (each run copies its environment)\n"
        f"503s waited through: {sum(retried)} in {sum(1 for r in retried if r)} cells "
        f"(most for one cell: {max(retried)})\n"
        f"server RSS: {rss_before / 1024:.1f} MB after warm-up, "
        f"{rss_after / 1024:.1f} MB after the run "
        f"(growth {(rss_after - rss_before) / 1024:+.1f} MB; during the run "
        f"{min(samples, default=0) / 1024:.1f}..{max(samples, default=0) / 1024:.1f} MB)"
    )

    # -- every output reached the right kernel and cell, exactly once ----------------------
    wrong = []
    for driver in drivers:
        k = driver.k
        assert len(driver.cells) == CELLS, f"kernel {k} ran {len(driver.cells)} cells"
        for i, cell in enumerate(driver.cells, start=1):
            got = (cell.status, cell.stdout, cell.stderr, cell.reply.get("execution_count"))
            want = ("ok", expected_stdout(k, i), "", WARM_UP + i)
            if got != want:
                wrong.append(f"kernel {k} cell {i}: {got!r} != {want!r}")
    assert not wrong, f"{len(wrong)} wrong cells:\n" + "\n".join(wrong[:20])

    # -- every environment holds exactly the files its cells wrote -------------------------
    sandbox = Sandbox(server.url, token=server.token)
    for driver in drivers:
        k = driver.k
        names = [file_name(k, i) for i in range(1, CELLS + 1)]
        md5 = hashlib.md5  # the sums `md5sum` prints, for the listing and for the contents
        listing = md5("".join(f"{name}\n" for name in names).encode()).hexdigest()
        contents = md5("".join(file_text(k, i) for i in range(1, CELLS + 1)).encode())
        want = f".sandbox_kernel\n{CELLS}\n{listing}  -\n{contents.hexdigest()}  -\n"
        assert driver.listing == want, f"kernel {k}"
        assert status_field(driver.status_text, "cells run") == str(WARM_UP + CELLS + 1)
        uuid = status_field(driver.status_text, "environment")
        with tarfile.open(fileobj=sandbox.download(uuid), mode="r:gz") as archive:
            files = {}
            for member in archive.getmembers():
                name = member.name.removeprefix("./")
                if member.isdir() or name.startswith(STATE_DIR):
                    continue
                extracted = archive.extractfile(member)
                files[name] = extracted.read().decode() if extracted else f"<{member.type!r}>"
        assert files == {file_name(k, i): file_text(k, i) for i in range(1, CELLS + 1)}, k

    # -- nothing left running, no working directory left -----------------------------------
    assert not processes_matching(MARK), "a cell's background process survived its cell"
    assert wait_until(lambda: len(list(workdirs.iterdir())) == WORKERS, 10), sorted(
        workdirs.iterdir()
    )
    leftovers = [p for p in workdirs.iterdir() if any(p.iterdir())]
    assert not leftovers, f"a prestarted runner's working directory is not empty: {leftovers}"
    staging = server.data_dir / "staging" / str(pid)
    assert not list(staging.iterdir()), f"uploads left in {staging}"
    saved = len([p for p in (server.data_dir / "environments").iterdir() if p.is_dir()])
    print(f"saved environments on disk: {saved}")

    # -- memory ---------------------------------------------------------------------------
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KB, (
        f"server RSS grew from {rss_before} kB to {rss_after} kB across the run"
    )

    # -- stop everything: nothing may outlive the kernels and the server -------------------
    running = descendants(pid)
    for kernel in kernels:
        kernel.stop()
    server.stop()
    assert wait_until(lambda: not living(running), 10)
    assert not processes_matching(MARK)
    assert not workdirs.exists(), f"{workdirs} left after the server stopped"
    assert not staging.exists(), f"{staging} left after the server stopped"
    print(f"whole test: {time.monotonic() - began:.1f} s")

"""Server benchmark: the figures of the protocol-foundation issue, side by side in one run.

    python bench/bench_server.py                      # embedded server, bubblewrap
    python bench/bench_server.py --plain              # ... and a NOT ISOLATED one beside it
    python bench/bench_server.py --url URL [--token T]  # any sandbox server, the public one too
    python bench/bench_server.py --quick              # smoke mode (CI): small sizes, short runs

Measured per target: a trivial execute, a carried-environment execute, the same carrying a
50 MB / 1000-file environment, 8 parallel ``sleep 1``, and sustained trivial throughput for
10 s from 8 client threads (with the 503s counted). Medians over repeated runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from sandbox_kernel import Sandbox
from sandbox_kernel._errors import SandboxHTTPError
from sandbox_kernel.discovery import EmbeddedServer

_MAKE_BIG_ENV = (
    "mkdir -p big && for i in $(seq 0 {last}); do "
    "head -c {size} /dev/urandom > big/f$i; done; du -sh big"
)


def _median_ms(function: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def trivial(sandbox: Sandbox, repeat: int) -> float:
    sandbox.execute({"commands": ["true"]})  # warm the connection
    return _median_ms(lambda: sandbox.execute({"commands": ["true"]}), repeat)


def carried(sandbox: Sandbox, repeat: int, setup: str = "echo 1 > f") -> float:
    """A chain of cells, each starting from the previous one's environment and saving."""
    state = {"uuid": sandbox.execute({"commands": [setup], "save": True})["environment"]}

    def cell() -> None:
        config = {"commands": ["echo x >> f"], "save": True, "environment": state["uuid"]}
        state["uuid"] = sandbox.execute(config)["environment"]

    return _median_ms(cell, repeat)


def big_environment(sandbox: Sandbox, repeat: int, files: int, size: int) -> float:
    setup = _MAKE_BIG_ENV.format(last=files - 1, size=size)
    return carried(sandbox, repeat, setup=f"{setup}; echo 1 > f")


def parallel_sleep(sandbox: Sandbox, count: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        config = {"commands": ["sleep 1"]}
        list(pool.map(lambda _: sandbox.execute(config, busy_budget=0), range(count)))
    return time.perf_counter() - started


def throughput(url: str, token: str | None, seconds: float, threads: int) -> tuple[float, int]:
    """Executions per second and 503 answers, ``threads`` clients back to back."""
    done = refused = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        nonlocal done, refused
        with Sandbox(url, token=token) as sandbox:
            while time.perf_counter() < deadline:
                try:
                    sandbox.execute({"commands": ["true"]}, busy_budget=0)
                    with lock:
                        done += 1
                except SandboxHTTPError as error:
                    if error.status_code != 503:
                        raise
                    with lock:
                        refused += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return done / (time.perf_counter() - started), refused


def measure(url: str, token: str | None, quick: bool) -> dict[str, str]:
    repeat = 5 if quick else 50
    files, size = (100, 10_000) if quick else (1000, 50_000)
    with Sandbox(url, token=token, timeout=120) as sandbox:
        results = {
            "trivial execute (median)": f"{trivial(sandbox, repeat):.1f} ms",
            "carried-environment execute (median)": f"{carried(sandbox, repeat):.1f} ms",
            f"carrying {files * size // 10**6} MB / {files} files (median)": (
                f"{big_environment(sandbox, max(3, repeat // 5), files, size):.1f} ms"
            ),
            "8 parallel `sleep 1` (wall)": f"{parallel_sleep(sandbox, 8):.2f} s",
        }
    rate, refused = throughput(url, token, 2 if quick else 10, 8)
    results["sustained trivial, 8 clients"] = f"{rate:.1f} exec/s, {refused} × 503"
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", default=[], help="a server to measure")
    parser.add_argument("--token", action="append", default=[], help="its token (same order)")
    parser.add_argument("--plain", action="store_true", help="also an --isolation none server")
    parser.add_argument("--no-embedded", action="store_true", help="only the --url servers")
    parser.add_argument("--quick", action="store_true", help="smoke mode")
    args = parser.parse_args()
    columns: dict[str, dict[str, str]] = {}
    with ExitStack() as stack:
        targets: list[tuple[str, str, str | None]] = []
        if not args.no_embedded:
            server = stack.enter_context(EmbeddedServer("--workers", "8", "--no-token"))
            targets.append(("embedded (bubblewrap)", server.url, None))
        if args.plain:
            plain = stack.enter_context(
                EmbeddedServer("--workers", "8", "--no-token", "--isolation", "none")
            )
            targets.append(("embedded (NOT ISOLATED)", plain.url, None))
        tokens = args.token + [None] * len(args.url)
        targets += [(url, url, token) for url, token in zip(args.url, tokens, strict=False)]
        for name, url, token in targets:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            columns[name] = measure(url, token, args.quick)
    rows = list(next(iter(columns.values())))
    print(f"machine: {os.cpu_count()} cores; mode: {'quick' if args.quick else 'full'}\n")
    print("| measure | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row} | " + " | ".join(column[row] for column in columns.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

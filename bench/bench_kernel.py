"""Kernel overhead: a ``true`` cell through the Sandbox kernel vs the same execute sent raw.

    python bench/bench_kernel.py [--quick] [--cells N]
    python bench/bench_kernel.py --panel [--quick]   # with vs without a live panel (1 s refresh)

Both run against one embedded server, side by side in one run, alternating so that machine
noise hits both alike. "raw" sends exactly what the kernel sends for the cell (the cell
script carrying the shell state, ``save``, ``result_path`` and the previous environment) with
``requests``; "kernel" is the round trip a front-end sees, from ``execute_request`` to the
reply, through ``jupyter_client``. Target: kernel <= raw + 4 ms (median).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from typing import Any

import requests
from jupyter_client.manager import KernelManager

from sandbox_kernel.discovery import EmbeddedServer
from sandbox_kernel.install import install
from sandbox_kernel.session.cellscript import (
    RESULT_PATH,
    build_script,
    next_state_file,
    parse_bookkeeping,
)

#: The raw cells' kernel session, as a Session names its state files.
_SESSION = secrets.token_hex(8)


def raw_cell(http: requests.Session, url: str, state: dict[str, Any]) -> float:
    nonce = secrets.token_hex(8)
    next_state = next_state_file(_SESSION, state.get("file"))
    config: dict[str, Any] = {
        "commands": [build_script("true", nonce, [], state.get("file"), next_state)],
        "save": True,
        "result_path": RESULT_PATH,
        "environ": {},
    }
    if state.get("uuid"):
        config["environment"] = state["uuid"]
    started = time.perf_counter()
    response = http.post(url + "execute/", files={"config": (None, json.dumps(config))})
    answer = response.json()
    elapsed = time.perf_counter() - started
    state["uuid"] = answer["environment"]
    book = parse_bookkeeping(answer.get("result"), nonce)
    if book is None:
        raise RuntimeError(f"the cell script failed: {answer}")
    state["file"] = book.state
    return elapsed


def kernel_cell(client: Any) -> float:
    started = time.perf_counter()
    reply = client.execute_interactive("true", timeout=60, output_hook=lambda message: None)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content']}")
    return elapsed


def start_kernel(env: dict[str, str]) -> tuple[KernelManager, Any]:
    manager = KernelManager(kernel_name="sandbox")
    manager.start_kernel(env=env)
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return manager, client


def panel_comparison(cells: int) -> int:
    """Cells in a kernel showing a panel refreshed every second vs a kernel without one."""
    with tempfile.TemporaryDirectory() as home, EmbeddedServer("--workers", "8") as server:
        os.environ["JUPYTER_DATA_DIR"] = os.path.join(home, "data")
        install(user=True)
        env = {**os.environ, "SANDBOX_URL": server.url, "SANDBOX_TOKEN": server.token or ""}
        plain, with_panel = start_kernel(env), start_kernel(env)
        try:
            with_panel[1].execute_interactive("%sandbox_panel --interval 1", timeout=60,
                                              output_hook=lambda message: None)  # fmt: skip
            time.sleep(2)
            for _ in range(5):
                kernel_cell(plain[1]), kernel_cell(with_panel[1])
            without, beside = [], []
            for _ in range(cells):
                without.append(kernel_cell(plain[1]))
                beside.append(kernel_cell(with_panel[1]))
        finally:
            for manager, client in (plain, with_panel):
                client.stop_channels()
                manager.shutdown_kernel()
    a, b = statistics.median(without) * 1000, statistics.median(beside) * 1000
    print(f"machine: {os.cpu_count()} cores; {cells} cells each, alternating\n")
    print("| measure | median |")
    print("|---|---|")
    print(f"| `true` cell, no panel | {a:.1f} ms |")
    print(f"| `true` cell, panel refreshing every 1 s | {b:.1f} ms |")
    print(f"| ratio | {b / a:.2f} (target <= 1.10) |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="smoke mode: 10 cells")
    parser.add_argument("--panel", action="store_true", help="with vs without a live panel")
    args = parser.parse_args()
    cells = 10 if args.quick else args.cells
    if args.panel:
        return panel_comparison(cells)
    with tempfile.TemporaryDirectory() as home, EmbeddedServer("--workers", "8") as server:
        os.environ["JUPYTER_DATA_DIR"] = os.path.join(home, "data")
        install(user=True)
        env = {**os.environ, "SANDBOX_URL": server.url, "SANDBOX_TOKEN": server.token or ""}
        manager = KernelManager(kernel_name="sandbox")
        manager.start_kernel(env=env)
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {server.token}"
        try:
            state: dict[str, Any] = {}
            for _ in range(5):  # warm up both paths
                raw_cell(http, server.url, state)
                kernel_cell(client)
            raw, kernel = [], []
            for _ in range(cells):
                raw.append(raw_cell(http, server.url, state))
                kernel.append(kernel_cell(client))
        finally:
            client.stop_channels()
            manager.shutdown_kernel()
    raw_ms, kernel_ms = statistics.median(raw) * 1000, statistics.median(kernel) * 1000
    print(f"machine: {os.cpu_count()} cores; {cells} cells each, alternating\n")
    print("| measure | median | p90 |")
    print("|---|---|---|")
    for name, values in (("raw execute (HTTP)", raw), ("kernel `true` cell", kernel)):
        ordered = sorted(values)
        p90 = ordered[int(len(ordered) * 0.9) - 1] * 1000
        print(f"| {name} | {statistics.median(values) * 1000:.1f} ms | {p90:.1f} ms |")
    print(f"| kernel overhead | {kernel_ms - raw_ms:+.1f} ms | (target <= +4 ms) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel overhead, beside the stock Python kernel, and how fast streamed lines reach a client.

    python bench/bench_kernel.py [--quick] [--cells N] [--stream-cells N]
    python bench/bench_kernel.py --panel [--quick]   # with vs without a live panel (1 s refresh)

One embedded server, one run, every column measured side by side:

- Overhead. The round trips take turns, so that machine noise hits them alike. "raw" sends
  exactly what the kernel sends for a ``true`` cell (the cell script carrying the shell state,
  ``save``, ``result_path`` and the previous environment), without the kernel: over the
  WebSocket ``execute/stream/`` where the server offers it, as the kernel does, and as
  ``POST execute/``. "kernel" is the round trip a front-end sees, from ``execute_request``
  to the reply, through ``jupyter_client``; "Python kernel" is the same for a ``pass`` cell of
  the stock Python kernel (ipykernel's ``python3`` kernelspec), started the same way; a
  do-nothing kernel run by the Sandbox kernel's own application shows what Jupyter's
  messaging alone costs a cell, which tells the kernel's own work apart. Targets (issue 12,
  medians): kernel <= raw + 2 ms, and kernel <= 2.2x the Python kernel.
- Live output. Cells print a line a second (``for i in 1 2 3 4 5; do ...; sleep 1; done`` in
  bash, and the same loop in Python and in C), each line carrying the wall clock at which it
  was printed (``$EPOCHREALTIME``, ``time.time()``, ``clock_gettime``); the client notes
  ``time.time()`` when the stream message holding the line arrives. Same machine, same clock:
  the difference is the delay a notebook user sees. Target: median <= 0.3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import requests
from jupyter_client.kernelspec import NoSuchKernel
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

#: The round trips compared, as the table names them.
RAW_HTTP = "raw execute/ (HTTP POST)"
RAW_STREAM = "raw execute/stream/ (WebSocket)"
KERNEL = "kernel `true` cell"
PYTHON = "Python kernel `pass` cell"
FLOOR = "do-nothing kernel, same application"

#: A kernel that answers every cell at once, run by the Sandbox kernel's own application
#: (no stdout capture, no sleep after a cell): what Jupyter's messaging alone costs a cell.
_FLOOR_KERNEL = """
from ipykernel.kernelbase import Kernel
from traitlets import Float
from sandbox_kernel.kernel.kernel import SandboxKernelApp

class FloorKernel(Kernel):
    implementation = implementation_version = banner = "do-nothing"
    language_info = {"name": "none"}
    _execute_sleep = Float(0.0)

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, **ignored):
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}

SandboxKernelApp.launch_instance(kernel_class=FloorKernel)
"""

#: The issue's targets.
OVERHEAD_TARGET_MS = 2.0
PYTHON_RATIO_TARGET = 2.2
LINE_DELAY_TARGET_S = 0.3

#: A C loop printing "<i> <seconds since the epoch>" every PAUSE seconds, COUNT times.
_C_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    int count = atoi(argv[1]);
    double pause = atof(argv[2]);
    struct timespec nap = {(time_t)pause, (long)((pause - (long)pause) * 1e9)};
    for (int i = 1; i <= count; i++) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        printf("%d %ld.%09ld\n", i, (long)now.tv_sec, now.tv_nsec);
        nanosleep(&nap, NULL);
    }
    return 0;
}
"""


def loop_cells(lines: int, pause: float) -> dict[str, str]:
    """The timed loops, by language: each line is ``<i> <epoch seconds when printed>``."""
    numbers = " ".join(str(i) for i in range(1, lines + 1))
    python = (
        "import time\n"
        f"for i in range(1, {lines + 1}):\n"
        "    print(i, repr(time.time())); time.sleep(" + repr(pause) + ")"
    )
    return {
        "bash": f'for i in {numbers}; do echo "$i $EPOCHREALTIME"; sleep {pause}; done',
        "python": f"python3 -c '{python}'",
        "c": f"./stream_loop {lines} {pause}",
    }


#: Compiles the C loop once, before the timed cells (its compile time is not measured).
C_SETUP = f"cat > stream_loop.c <<'EOF'{_C_LOOP}EOF\ngcc -O2 -o stream_loop stream_loop.c"

_TIMED_LINE = re.compile(r"^(\d+) (\d+[.,]\d+)$")


# -- the three round trips ----------------------------------------------------------------------


class RawCells:
    """A ``true`` cell's execute sent as the kernel sends it, without the kernel: the cell
    script carrying the shell state, ``save``, ``result_path`` and the previous environment.
    Each way of sending keeps its own chain of environments."""

    def __init__(self) -> None:
        self.uuid: str | None = None
        self.state_file: str | None = None

    def config(self, nonce: str) -> dict[str, Any]:
        next_state = next_state_file(_SESSION, self.state_file)
        config: dict[str, Any] = {
            "commands": [build_script("true", nonce, [], self.state_file, next_state)],
            "save": True,
            "result_path": RESULT_PATH,
            "environ": {},
        }
        if self.uuid:
            config["environment"] = self.uuid
        return config

    def record(self, answer: dict[str, Any], nonce: str) -> None:
        self.uuid = answer["environment"]
        book = parse_bookkeeping(answer.get("result"), nonce)
        if book is None:
            raise RuntimeError(f"the cell script failed: {answer}")
        self.state_file = book.state


class RawHttp(RawCells):
    """``POST execute/`` with ``requests``, on a kept-alive connection."""

    def __init__(self, url: str, token: str | None) -> None:
        super().__init__()
        self.url = url + "execute/"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def cell(self) -> float:
        nonce = secrets.token_hex(8)
        form = {"config": (None, json.dumps(self.config(nonce)))}
        started = time.perf_counter()
        answer = self.http.post(self.url, files=form).json()
        elapsed = time.perf_counter() - started
        self.record(answer, nonce)
        return elapsed


class RawStream(RawCells):
    """The WebSocket ``execute/stream/`` (docs/protocol-extensions.md) with aiohttp, on an
    event loop of its own: config, empty archive, frames until the final object."""

    def __init__(self, url: str, token: str | None) -> None:
        super().__init__()
        self.url = url + "execute/stream/"
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._session(token))

    @staticmethod
    async def _session(token: str | None) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})

    def cell(self) -> float:
        nonce = secrets.token_hex(8)
        config = json.dumps(self.config(nonce))
        started = time.perf_counter()
        answer = self.loop.run_until_complete(self._run(config))
        elapsed = time.perf_counter() - started
        self.record(answer, nonce)
        return elapsed

    async def _run(self, config: str) -> dict[str, Any]:
        async with self.session.ws_connect(self.url) as socket:
            await socket.send_str(config)
            await socket.send_bytes(b"")
            async for message in socket:
                frame: dict[str, Any] = json.loads(message.data)
                if "status" in frame:
                    return frame
                if "error" in frame:
                    raise RuntimeError(f"execute/stream/ refused the cell: {frame}")
        raise RuntimeError("execute/stream/ closed before its final object")

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


def kernel_cell(client: Any, code: str = "true") -> float:
    """A cell's round trip as a front-end sees it; seconds."""
    started = time.perf_counter()
    reply = client.execute_interactive(code, timeout=60, output_hook=lambda message: None)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell {code!r} failed: {reply['content']}")
    return elapsed


def install_floor_kernel(data_dir: str) -> str:
    """The do-nothing kernel's kernelspec, in the run's own Jupyter data directory."""
    folder = os.path.join(data_dir, "kernels", "bench-floor")
    os.makedirs(folder, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-c", _FLOOR_KERNEL, "-f", "{connection_file}"],
        "display_name": "do-nothing (bench)",
        "language": "none",
    }
    with open(os.path.join(folder, "kernel.json"), "w") as file:
        json.dump(spec, file)
    return "bench-floor"


def start_kernel(env: dict[str, str], name: str = "sandbox") -> tuple[KernelManager, Any]:
    manager = KernelManager(kernel_name=name)
    try:
        manager.start_kernel(env=env)
    except NoSuchKernel:
        sys.exit(f"no {name!r} kernelspec: install ipykernel (pip install ipykernel)")
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return manager, client


def stop_kernels(*kernels: tuple[KernelManager, Any]) -> None:
    for manager, client in kernels:
        client.stop_channels()
        manager.shutdown_kernel()


# -- live output --------------------------------------------------------------------------------


@dataclass
class LineDelays:
    """Seconds from a line being printed in the sandbox to its arrival at the client."""

    every: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    #: Cells whose first line arrived after their last was printed: not streamed at all.
    whole_at_end: int = 0


def timed_lines(client: Any, code: str, lines: int) -> tuple[list[float], bool]:
    """Run ``code`` (printing timed lines); each line's delay, and whether the first line
    arrived before the last one was printed (streamed, rather than all shown at the end)."""
    arrivals: list[tuple[float, str]] = []  # (time.time() at arrival, complete line)
    partial = ""

    def output(message: dict[str, Any]) -> None:
        nonlocal partial
        if message["msg_type"] == "stream" and message["content"]["name"] == "stdout":
            now = time.time()
            *complete, partial = (partial + message["content"]["text"]).split("\n")
            arrivals.extend((now, line) for line in complete)

    reply = client.execute_interactive(code, timeout=120, output_hook=output)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell {code!r} failed: {reply['content']}")
    printed = []
    for _arrived, line in arrivals:
        match = _TIMED_LINE.match(line.strip())
        if match is None:
            raise RuntimeError(f"cell {code!r} printed {line!r}, not '<i> <seconds>'")
        printed.append(float(match[2].replace(",", ".")))
    if len(printed) != lines:
        raise RuntimeError(f"cell {code!r} printed {len(printed)} lines, not {lines}")
    delays = [arrived - at for (arrived, _line), at in zip(arrivals, printed, strict=True)]
    return delays, arrivals[0][0] < printed[-1]


def measure_streams(client: Any, cells: int, lines: int, pause: float) -> dict[str, LineDelays]:
    """``cells`` timed loops per language, the languages taking turns."""
    kernel_cell(client, C_SETUP)
    programs = loop_cells(lines, pause)
    results = {language: LineDelays() for language in programs}
    for _ in range(cells):
        for language, code in programs.items():
            delays, streamed = timed_lines(client, code, lines)
            results[language].every.extend(delays)
            results[language].first.append(delays[0])
            results[language].whole_at_end += not streamed
    return results


# -- the report -----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(int(len(ordered) * 0.9) - 1, 0)]


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def overhead_table(timings: dict[str, list[float]], kernel_sends: str) -> None:
    """The round trips, then the kernel against the raw request it sends and against the
    Python kernel."""
    print("| measure | median | p90 | target |")
    print("|---|---|---|---|")
    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name, values in timings.items():
        print(f"| {name} | {ms(medians[name])} | {ms(p90(values))} | |")
    kernel = medians[KERNEL]
    for raw in (RAW_STREAM, RAW_HTTP):
        if raw not in medians:
            continue
        overhead_ms = (kernel - medians[raw]) * 1000
        met = verdict(overhead_ms <= OVERHEAD_TARGET_MS)
        target = f"<= +{OVERHEAD_TARGET_MS:.0f} ms: {met}" if raw == kernel_sends else ""
        print(f"| kernel overhead (kernel - {raw.split(' (')[0]}) | {overhead_ms:+.1f} ms | "
              f"| {target} |")  # fmt: skip
    own = kernel - medians[kernel_sends] - medians[FLOOR]
    print(f"| the Sandbox kernel's own work (overhead - do-nothing kernel) | {own * 1000:+.1f} ms "
          "| | |")  # fmt: skip
    ratio = kernel / medians[PYTHON]
    print(f"| kernel / Python kernel | {ratio:.2f}x | "
          f"| <= {PYTHON_RATIO_TARGET}x: {verdict(ratio <= PYTHON_RATIO_TARGET)} |")  # fmt: skip


def stream_table(results: dict[str, LineDelays]) -> None:
    print("| loop | lines | median delay | p90 | max | first line (median) | target |")
    print("|---|---|---|---|---|---|---|")
    for language, delays in results.items():
        median = statistics.median(delays.every)
        print(
            f"| {language} | {len(delays.every)} | {ms(median)} | {ms(p90(delays.every))} "
            f"| {ms(max(delays.every))} | {ms(statistics.median(delays.first))} "
            f"| <= {LINE_DELAY_TARGET_S} s: {verdict(median <= LINE_DELAY_TARGET_S)} |"
        )
    late = sum(delays.whole_at_end for delays in results.values())
    if late:
        print(f"\n{late} cells showed their first line only when they ended: not streamed.")


# -- runs -----------------------------------------------------------------------------------------


def advertised_extensions(http: requests.Session, url: str) -> list[str]:
    """The server's top-level ``extensions`` (absent: a server that does not stream)."""
    extensions: list[str] = http.get(url + "specifications/").json().get("extensions", [])
    return extensions


def alternate(
    rounds: int, measures: list[Callable[[], float]], warm_up: int = 5
) -> list[list[float]]:
    """``rounds`` of each measure, taking turns, after ``warm_up`` untimed rounds."""
    for _ in range(warm_up):
        for measure in measures:
            measure()
    timings: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for measure, values in zip(measures, timings, strict=True):
            values.append(measure())
    return timings


def main_comparison(cells: int, stream_cells: int, lines: int, pause: float) -> int:
    with tempfile.TemporaryDirectory() as home, EmbeddedServer("--workers", "8") as server:
        os.environ["JUPYTER_DATA_DIR"] = os.path.join(home, "data")
        install(user=True)
        env = {**os.environ, "SANDBOX_URL": server.url, "SANDBOX_TOKEN": server.token or ""}
        http = RawHttp(server.url, server.token)
        extensions = advertised_extensions(http.http, server.url)
        # What the kernel sends a cell as: the WebSocket where the server offers it.
        stream = RawStream(server.url, server.token) if "stream" in extensions else None
        kernel_sends = RAW_STREAM if stream else RAW_HTTP
        floor_name = install_floor_kernel(os.environ["JUPYTER_DATA_DIR"])
        sandbox, python = start_kernel(env), start_kernel(env, "python3")
        floor = start_kernel(env, floor_name)
        try:
            measures: dict[str, Callable[[], float]] = {RAW_HTTP: http.cell}
            if stream:
                measures[RAW_STREAM] = stream.cell
            measures[KERNEL] = lambda: kernel_cell(sandbox[1])
            measures[PYTHON] = lambda: kernel_cell(python[1], "pass")
            measures[FLOOR] = lambda: kernel_cell(floor[1], "")
            timings = dict(zip(measures, alternate(cells, list(measures.values())), strict=True))
            streams = measure_streams(sandbox[1], stream_cells, lines, pause)
        finally:
            stop_kernels(sandbox, python, floor)
            if stream:
                stream.close()
    print(f"machine: {os.cpu_count()} cores; server extensions: {extensions or 'none'}\n")
    print(f"{cells} cells each, taking turns; the kernel sends {kernel_sends}:\n")
    overhead_table(timings, kernel_sends)
    print(f"\n{stream_cells} cells per loop of {lines} lines, {pause} s apart:\n")
    stream_table(streams)
    return 0


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
            without, beside = alternate(
                cells, [lambda: kernel_cell(plain[1]), lambda: kernel_cell(with_panel[1])]
            )
        finally:
            stop_kernels(plain, with_panel)
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
    parser.add_argument("--cells", type=int, default=200, help="overhead cells of each kind")
    parser.add_argument(
        "--stream-cells", type=int, default=4, help="timed loops of 5 lines per language"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 10 cells, one short loop per language"
    )
    parser.add_argument("--panel", action="store_true", help="with vs without a live panel")
    args = parser.parse_args()
    cells = 10 if args.quick else args.cells
    if args.panel:
        return panel_comparison(cells)
    if args.quick:
        return main_comparison(cells, stream_cells=1, lines=3, pause=0.2)
    return main_comparison(cells, args.stream_cells, lines=5, pause=1)


if __name__ == "__main__":
    sys.exit(main())

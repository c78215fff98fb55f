"""A class on JupyterHub: each student's cell latency, alone and beside a greedy neighbour.

    python bench/bench_hub.py                  # 20 students (about 2 minutes)
    python bench/bench_hub.py --quick          # smoke mode (CI): 4 students, under a minute
    python bench/bench_hub.py --no-share       # the same beside a Hub whose sandbox gives one
                                               # user as many runs as it has slots
    python bench/bench_hub.py --json out.json  # the figures as JSON too

One run starts a real JupyterHub on loopback with ``examples/jupyterhub/jupyterhub_config.py``
(the harness of ``tests/hub``: DummyAuthenticator, SimpleLocalProcessSpawner, the sandbox as
the Hub's managed service with ``--per-user-runs 2 --workers 8``, configurable-http-proxy from
``build/hub-proxy``), starts every student's server and one Sandbox kernel each, and one
greedy student with as many kernels as greedy cells. Cells go through the proxy and the
kernel WebSocket API, as from JupyterLab.

Phases take turns (alone, greedy, alone, greedy...), so that the machine's drift falls on both
columns. In a phase every quiet student types small cells (a carried variable, one line of
output) with think times between them, for a fixed time (a cell held up for the whole phase
counts as one slow cell); in a greedy phase the greedy student also runs 4
CPU-bound bash loops in every one of its kernels at once, until the phase's end. The table gives
the quiet students' cell latency (from the execute request to the reply) in both columns, and
what the sandbox's ``usages/`` showed a teacher of the greedy student's share.

``--no-share`` measures the same on a second Hub whose sandbox lets one user run as many cells
as the server has slots (``--per-user-runs`` = ``--workers``): what the per-user share buys.

Every process is stopped at the end, even on Ctrl-C or a failure. Exit status 1 when a cell
failed; a ratio over 2 is only reported (tests/hub asserts it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hub.harness import (  # noqa: E402  (the repository's root is on the path first)
    BackgroundLoop,
    Hub,
    HubAPI,
    KernelConnection,
    MissingPrerequisite,
    SandboxAsUser,
    client_session,
    gather_all,
    greedy_cell,
    percentile,
    quiet_cells,
    usages_of_everyone,
)

WORKERS = 8
#: CPU-bound loops in each greedy cell (as tests/hub): 2 running cells are 8 busy processes.
GREEDY_LOOPS = 4
PER_USER_RUNS = 2
TEACHER = "teacher"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much one run measures: the full run, or CI's quick smoke run."""

    students: int
    greedy_cells: int
    #: Alone/greedy pairs of phases.
    turns: int
    #: How long the quiet students type cells in each phase, seconds.
    phase_seconds: float
    #: Think time between a student's cells, seconds (randomised around it).
    think: float

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(students=4, greedy_cells=6, turns=1, phase_seconds=3.0, think=0.2)
        return cls(students=20, greedy_cells=20, turns=2, phase_seconds=10.0, think=0.3)


@dataclasses.dataclass
class Figures:
    """What one Hub measured."""

    label: str
    alone: list[float] = dataclasses.field(default_factory=list)
    greedy: list[float] = dataclasses.field(default_factory=list)
    #: The greedy student's share in usages/ (a teacher's view), midway through each phase.
    shares: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    greedy_cells_done: int = 0


@dataclasses.dataclass
class Class:
    hub: Hub
    api: HubAPI
    quiet: list[KernelConnection]
    greedy: list[KernelConnection]
    greedy_name: str
    teacher: SandboxAsUser


async def gather_class(hub: Hub, sizes: Sizes) -> Class:
    http = client_session()
    api = HubAPI(hub, http)
    names = [f"student{number:02d}" for number in range(1, sizes.students + 1)]
    greedy_name = "greedy"
    await api.create_users([*names, greedy_name, TEACHER])
    await gather_all(api.start_server(name) for name in [*names, greedy_name])

    async def kernels_of(name: str, count: int) -> list[KernelConnection]:
        token = await api.token_for(name)
        return await gather_all(
            KernelConnection.start(http, hub, name, token) for _ in range(count)
        )

    quiet = [kernels[0] for kernels in await gather_all(kernels_of(name, 1) for name in names)]
    greedy = await kernels_of(greedy_name, sizes.greedy_cells)
    teacher = SandboxAsUser(http, hub, await api.token_for(TEACHER))
    await gather_all(kernel.execute("echo warm") for kernel in [*quiet, *greedy])
    return Class(hub, api, quiet, greedy, greedy_name, teacher)


async def quiet_phase(room: Class, sizes: Sizes, label: str) -> list[float]:
    per_student = await gather_all(
        quiet_cells(kernel, sizes.phase_seconds, label, sizes.think) for kernel in room.quiet
    )
    return [latency for latencies in per_student for latency in latencies]


async def measure(room: Class, sizes: Sizes, figures: Figures) -> None:
    settle = 1.0
    for turn in range(sizes.turns):
        figures.alone += await quiet_phase(room, sizes, f"alone{turn}")
        # The loops end just after the phase; the queued ones then start and end at once.
        deadline = math.ceil(time.time() + settle + sizes.phase_seconds + 1.5)
        loops = [
            asyncio.ensure_future(kernel.execute(greedy_cell(deadline, GREEDY_LOOPS), timeout=300))
            for kernel in room.greedy
        ]
        await asyncio.sleep(settle)
        phase = asyncio.ensure_future(quiet_phase(room, sizes, f"greedy{turn}"))
        await asyncio.sleep(sizes.phase_seconds / 2)
        everyone = await usages_of_everyone(room.teacher)
        figures.shares.append(everyone.get(room.greedy_name, {}))
        figures.greedy += await phase
        replies = await gather_all(loops)
        figures.greedy_cells_done += sum("greedy-done" in reply.stdout for reply in replies)


def run_hub(label: str, per_user_runs: int, sizes: Sizes, scratch: Path) -> Figures:
    """One Hub, its class, and its figures; everything it started is stopped."""
    figures = Figures(label)
    loop = BackgroundLoop()
    hub = Hub(
        scratch / label.replace(" ", "-"),
        per_user_runs=per_user_runs,
        serve_args=["--workers", str(WORKERS)],
        teachers=[TEACHER],
    )
    try:
        started = time.monotonic()
        hub.start()
        room = loop.run(gather_class(hub, sizes), timeout=600)
        print(
            f"{label}: the Hub, {sizes.students + 1} servers and "
            f"{sizes.students + sizes.greedy_cells} kernels are up in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        loop.run(measure(room, sizes, figures), timeout=1200)
        loop.run(room.api.http.close())
    finally:
        hub.stop()
        loop.close()
    return figures


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def table(all_figures: list[Figures], sizes: Sizes) -> str:
    header = ["measure"]
    for figures in all_figures:
        header += [f"alone ({figures.label})", f"greedy neighbour ({figures.label})"]
    rows = [
        ["quiet cells measured"]
        + [str(n) for f in all_figures for n in (len(f.alone), len(f.greedy))],
        ["median cell latency"]
        + [milliseconds(median(v)) for f in all_figures for v in (f.alone, f.greedy)],
        ["p90 cell latency"]
        + [milliseconds(percentile(v, 0.9)) for f in all_figures for v in (f.alone, f.greedy)],
        ["max cell latency"]
        + [milliseconds(max(v)) for f in all_figures for v in (f.alone, f.greedy)],
        ["ratio of medians (greedy / alone)"]
        + [cell for f in all_figures for cell in ("", f"{median(f.greedy) / median(f.alone):.2f}")],
        ["greedy student's runs: running / queued"]
        + [
            cell
            for f in all_figures
            for cell in (
                "",
                ", ".join(f"{s.get('running')} / {s.get('queued')}" for s in f.shares),
            )
        ],
    ]
    lines = [
        f"{sizes.students} quiet students typing cells for {sizes.phase_seconds:.0f} s per "
        f"phase, {sizes.turns} turn(s) of each column; the greedy student runs "
        f"{GREEDY_LOOPS} loops in each of {sizes.greedy_cells} cells at once",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode (CI): small sizes")
    parser.add_argument(
        "--no-share",
        action="store_true",
        help="also measure a Hub whose sandbox gives one user all its slots",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    sizes = Sizes.of(args.quick)
    scratch = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    all_figures: list[Figures] = []
    try:
        all_figures.append(
            run_hub(f"--per-user-runs {PER_USER_RUNS}", PER_USER_RUNS, sizes, scratch)
        )
        if args.no_share:
            all_figures.append(run_hub(f"--per-user-runs {WORKERS}", WORKERS, sizes, scratch))
    except MissingPrerequisite as error:
        print(f"bench_hub: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        print(f"bench_hub: a cell or the Hub failed: {error}", file=sys.stderr)
        print(f"(logs kept in {scratch})", file=sys.stderr)
        return 1
    print(table(all_figures, sizes))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(f) for f in all_figures], indent=2))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A test table against the same runs written by hand: what checking costs a teacher.

    python bench/bench_check.py [--rounds N] [--cases N]
    python bench/bench_check.py --quick     # smoke mode (CI): 3 rounds

One embedded server, one Sandbox kernel (through ``jupyter_client``, as a front-end sees a
cell), one run, the two cells taking turns so that machine noise hits them alike:

- table: ``%%sandbox_check ./sum`` with a table of 20 cases (``--cases``) (a C program that adds two
  integers, each case a different stdin), which runs every case in one request through the
  generated harness (``sandbox_kernel/checking/harness.py``) and compares in the kernel;
- loop: the same 20 runs written by hand, one bash loop in one cell, as the teaching notebook
  used to: ``got=$(echo "$input" | ./sum)``, compared, ``PASS``/``FAIL`` printed.

Target (issue 13): the table's median <= 1.5 x the loop's. Both cells' outputs are checked
(20 passed, 20 PASS), so a check that stops comparing cannot look fast.

Where the time goes, measured in the same run without the kernel (``--no-breakdown`` leaves
it out): the check's own ``execute/`` request, built by the harness and sent by the client,
and the loop's script sent as one ``execute/``, each with all the cases and with one, beside
a ``true``: what a request costs whatever it runs, and what each case adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench_kernel import alternate, ms, p90, start_kernel, stop_kernels

from sandbox_kernel.checking.harness import build_request, plan_batches
from sandbox_kernel.checking.table import parse_table
from sandbox_kernel.discovery import EmbeddedServer
from sandbox_kernel.install import install
from sandbox_kernel.session.context import SandboxContext

RATIO_TARGET = 1.5
#: The two kernel cells compared.
TABLE, LOOP = "table", "loop"

SUM_C = r"""
#include <stdio.h>
int main(void) {
    long a, b;
    if (scanf("%ld %ld", &a, &b) != 2) return 1;
    printf("%ld\n", a + b);
    return 0;
}
"""
SETUP = f"cat > sum.c <<'EOF'{SUM_C}EOF\ngcc -O2 -o sum sum.c"


def cases(count: int) -> list[tuple[str, str]]:
    """``count`` different inputs (two integers) and the sums expected."""
    pairs = [(37 * i - 200, i * i - 50 * (i % 3)) for i in range(count)]
    return [(f"{a} {b}", str(a + b)) for a, b in pairs]


def _rows(table: list[tuple[str, str]]) -> str:
    """The cases as a YAML list."""
    return "\n".join(f'- stdin: "{stdin}"\n  expect: "{expect}"' for stdin, expect in table)


def table_cell(table: list[tuple[str, str]]) -> str:
    return "%%sandbox_check ./sum\n" + _rows(table)


def loop_cell(table: list[tuple[str, str]]) -> str:
    """The runs written by hand, as a teacher would (the teaching notebook's old loop)."""
    inputs = " ".join(f'"{stdin}"' for stdin, _ in table)
    expected = " ".join(expect for _, expect in table)
    return f"""inputs=({inputs})
expected=({expected})
for i in "${{!inputs[@]}}"; do
    got=$(echo "${{inputs[i]}}" | ./sum)
    if [ "$got" = "${{expected[i]}}" ]; then verdict=PASS; else verdict=FAIL; fi
    echo "$verdict ${{inputs[i]}} -> $got"
done"""


# -- through the kernel ---------------------------------------------------------------------------


def timed_cell(client: Any, code: str) -> tuple[float, str]:
    """A cell's round trip as a front-end sees it (seconds), and the text it showed."""
    shown: list[str] = []

    def output(message: dict[str, Any]) -> None:
        content = message["content"]
        if message["msg_type"] == "stream":
            shown.append(content["text"])
        elif message["msg_type"] in ("display_data", "execute_result"):
            shown.append(content["data"].get("text/plain", ""))
        elif message["msg_type"] == "error":
            shown.append(f"{content['ename']}: {content['evalue']}")

    started = time.perf_counter()
    reply = client.execute_interactive(code, timeout=120, output_hook=output)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content']}\n{''.join(shown)}")
    return elapsed, "".join(shown)


def checked(client: Any, code: str, must_show: str, count: int) -> Callable[[], float]:
    """A measure that runs ``code`` and fails unless it showed ``must_show`` ``count`` times:
    a cell that stopped comparing would be fast for nothing."""

    def measure() -> float:
        elapsed, text = timed_cell(client, code)
        if text.count(must_show) != count:
            raise RuntimeError(f"expected {count} x {must_show!r}, the cell showed:\n{text}")
        return elapsed

    return measure


# -- without the kernel: where the table's time goes -----------------------------------------------


def harness_request(context: SandboxContext, rows: str, run: str) -> Callable[[], float]:
    """The check's one ``execute/``, built by the harness as the magic builds it, sent by the
    session's client: no kernel, no comparison."""
    session = context.session
    table = parse_table(rows, run=run, resolve=_refuse)
    budget = (session.server_timeout() or 10.0) - 1
    [batch] = plan_batches(table.cases, budget)

    def measure() -> float:
        request = build_request(
            batch, run, state_file=session.state_file, environment=session.environment,
            environ=dict(session.environ), request_timeout=budget + 1, stop_on_failure=False,
        )  # fmt: skip
        started = time.perf_counter()
        answer = session.client.execute(request.config, request.archive)
        elapsed = time.perf_counter() - started
        if not answer.get("result") or answer.get("status") != 0:
            raise RuntimeError(f"the harness failed: {answer}")
        return elapsed

    return measure


def _refuse(name: str) -> Any:
    raise ValueError(f"no expect_file in the bench's table ({name})")


def plain_request(context: SandboxContext, command: str) -> Callable[[], float]:
    """One ``execute/`` of ``command`` in the session's environment, not saved, as the
    check's request is: the loop without the kernel's cell script and save."""
    session = context.session

    def measure() -> float:
        config: dict[str, Any] = {"commands": [command], "save": False}
        if session.environment:
            config["environment"] = session.environment
        started = time.perf_counter()
        answer = session.client.execute(config)
        elapsed = time.perf_counter() - started
        if answer.get("status") != 0:
            raise RuntimeError(f"{command!r} failed: {answer}")
        return elapsed

    return measure


# -- the run ---------------------------------------------------------------------------------------


def compare(rounds: int, count: int, warm_up: int, breakdown: bool) -> int:
    table = cases(count)
    with tempfile.TemporaryDirectory() as home, EmbeddedServer("--workers", "8") as server:
        os.environ["JUPYTER_DATA_DIR"] = os.path.join(home, "data")
        install(user=True)
        env = {**os.environ, "SANDBOX_URL": server.url, "SANDBOX_TOKEN": server.token or ""}
        kernel = start_kernel(env)
        context = SandboxContext(url=server.url, token=server.token or "")
        try:
            client = kernel[1]
            timed_cell(client, SETUP)
            measures: dict[str, Callable[[], float]] = {
                TABLE: checked(client, table_cell(table), "✓ passed", count),
                LOOP: checked(client, loop_cell(table), "PASS ", count),
            }
            if breakdown:
                setup = context.session.run_cell(SETUP)
                if not setup.ok:
                    raise RuntimeError(f"the bench's program did not build: {setup.stderr}")
                measures.update(_breakdown(context, table))
            timings = dict(
                zip(measures, alternate(rounds, list(measures.values()), warm_up), strict=True)
            )
        finally:
            stop_kernels(kernel)
            context.close()
    report(timings, rounds, count)
    return 0


#: The raw requests of the breakdown, as the report names them.
HARNESS = "raw: the check's execute/ (harness), {count} cases"
HARNESS_ONE = "raw: the same, 1 case"
LOOP_RAW = "raw: the loop's script as one execute/ (not saved), {count} runs"
LOOP_ONE = "raw: the same, 1 run"
TRUE = "raw: `true` (not saved)"


def _breakdown(
    context: SandboxContext, table: list[tuple[str, str]]
) -> dict[str, Callable[[], float]]:
    """Raw requests with all the cases and with one: what is fixed, what each case adds."""
    count = len(table)
    return {
        HARNESS.format(count=count): harness_request(context, _rows(table), "./sum"),
        HARNESS_ONE: harness_request(context, _rows(table[:1]), "./sum"),
        LOOP_RAW.format(count=count): plain_request(context, loop_cell(table)),
        LOOP_ONE: plain_request(context, loop_cell(table[:1])),
        TRUE: plain_request(context, "true"),
    }


def report(timings: dict[str, list[float]], rounds: int, count: int) -> None:
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(f"machine: {os.cpu_count()} cores; {rounds} rounds, the measures taking turns\n")
    print("| measure | median | p90 |")
    print("|---|---|---|")
    labels = {
        TABLE: f"`%%sandbox_check` cell, {count} cases (kernel)",
        LOOP: f"bash loop cell, the same {count} runs (kernel)",
    }
    for name, values in timings.items():
        print(f"| {labels.get(name, name)} | {ms(medians[name])} | {ms(p90(values))} |")
    ratio = medians[TABLE] / medians[LOOP]
    met = "met" if ratio <= RATIO_TARGET else "MISSED"
    print(f"| table / loop | {ratio:.2f}x | target <= {RATIO_TARGET}x: {met} |")
    harness = HARNESS.format(count=count)
    if harness in medians and count > 1:
        print("\n| raw request | fixed (1 case - `true`) | each further case |")
        print("|---|---|---|")
        for name, many, one in (("harness", harness, HARNESS_ONE),
                                ("loop", LOOP_RAW.format(count=count), LOOP_ONE)):  # fmt: skip
            fixed = medians[one] - medians[TRUE]
            each = (medians[many] - medians[one]) / (count - 1)
            print(f"| {name} | {ms(fixed)} | {each * 1000:.2f} ms |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of each measure")
    parser.add_argument("--cases", type=int, default=20, help="cases in the table")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 3 rounds, 1 warm-up")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="only the two kernel cells, no raw requests"
    )
    args = parser.parse_args()
    rounds, warm_up = (3, 1) if args.quick else (args.rounds, 3)
    return compare(rounds, args.cases, warm_up, breakdown=not args.no_breakdown)


if __name__ == "__main__":
    sys.exit(main())

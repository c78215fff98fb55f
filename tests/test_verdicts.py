"""Named verdicts for every cell (issue 13, section 2): the embedded server says why a command
was killed or cut (``cause`` and ``signal`` in its ``execution`` entries, extension
``causes``, docs/protocol-extensions.md), and the kernel words a failed cell from it; against
a server without the extension (a real proxy strips it) the kernel guesses from the exit
status and says "probably".

Real server processes over loopback, real C, Python and bash programs in bubblewrap, real
kernels through jupyter_client.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.async_client import AsyncSandbox
from sandbox_kernel.protocol import EXTENSION_CAUSES

from .conftest import KernelSession, Server
from .proxy import CountingProxy

StartKernel = Callable[..., KernelSession]

MEMORY_LIMIT_MIB = 64
MAX_OUTPUT = 16 * 1024
#: The contract's keys of an ``execution`` entry: all a clean command's entry has.
CONTRACT_KEYS = {"command", "exit_code", "stdout", "stderr", "time"}
OBSERVED = Path(__file__).parent / "fixtures" / "observed" / "reference-3.0.3-responses.json"

SEGFAULT_C = r"""
#include <stdio.h>
int main(void) {
    volatile int *nowhere = 0;
    puts("before the crash");
    fflush(stdout);
    return *nowhere;
}
"""
DIVIDE_BY_ZERO_C = r"""
int main(void) {
    volatile int numerator = 7, zero = 0; /* 1 / zero would be compiled without a division */
    return numerator / zero;
}
"""
MEMORY_HOG_C = r"""
#include <stdlib.h>
#include <string.h>
int main(void) {
    for (;;) {
        char *block = malloc(1 << 20);
        if (block == NULL) return 3;
        memset(block, 1, 1 << 20);
    }
}
"""
PYTHON_HOG = "python3 -c 'hog = b\"x\" * (400 << 20)'"


def compiled(source: str, then: str = "./prog") -> str:
    """A command that compiles C ``source`` to ./prog with gcc, then runs ``then``."""
    return f"cat > prog.c <<'EOF'\n{source}\nEOF\ngcc -O0 -o prog prog.c || exit 90\n{then}"


@pytest.fixture(scope="module")
def limited(start_server: Callable[..., Server]) -> Server:
    """A server with a small memory cap and output cap; its cgroups must work (the memory
    cause is read from them)."""
    server = start_server(
        "--workers", "2", "--memory-limit", f"{MEMORY_LIMIT_MIB}M", "--max-output", str(MAX_OUTPUT)
    )
    isolation = server.get("specifications/").json()["container"]["isolation"]
    assert isolation["cgroups"], (
        "these tests need per-run memory cgroups (the memory cause is read from them); the "
        f"server reports {isolation}: run them as root on a machine with cgroups"
    )
    return server


def entry_of(server: Server, command: Any, **config: Any) -> dict[str, Any]:
    """The one ``execution`` entry of a run of ``command``."""
    [entry] = server.run(command, **config)["execution"]
    return entry


def cause_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The keys an entry has beyond the contract's."""
    return {key: value for key, value in entry.items() if key not in CONTRACT_KEYS}


# -- the server's entries ---------------------------------------------------------------------


def test_specifications_name_the_extension(limited: Server) -> None:
    assert EXTENSION_CAUSES in limited.get("specifications/").json()["extensions"]


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        ("echo fine", 0),
        ("-exit 1", 1),
        ("-no_such_command_here", 127),
        ("-exit 128", 128),  # 128 + 0: no signal
        ("-exit 148", 148),  # 128 + SIGTSTP: stops, never kills
        ("-exit 255", 255),
        ("-python3 -c 'import sys; sys.exit(2)'", 2),
    ],
)
def test_a_command_that_ends_by_itself_keeps_the_contract_keys(
    limited: Server, command: str, exit_code: int
) -> None:
    entry = entry_of(limited, command)
    assert entry["exit_code"] == exit_code, entry
    assert set(entry) == CONTRACT_KEYS, "extra keys only for killed or cut commands"


@pytest.mark.parametrize(
    ("command", "exit_code", "name"),
    [
        (compiled(SEGFAULT_C), 139, "SIGSEGV"),  # the program is bash -c's last command: exec'd
        (compiled(SEGFAULT_C, "./prog; exit $?"), 139, "SIGSEGV"),  # bash reports 128 + 11
        (compiled(DIVIDE_BY_ZERO_C), 136, "SIGFPE"),
        ("python3 -c 'import os; os.abort()'", 134, "SIGABRT"),
        ("bash -c 'kill -TERM $$'", 143, "SIGTERM"),
        ("sh -c 'kill -KILL $$'", 137, "SIGKILL"),  # not the memory cap's
        ("ulimit -f 1; head -c 100000 /dev/zero > big; exit $?", 153, "SIGXFSZ"),
        ("set -o pipefail; yes | head -n 1 >/dev/null", 141, "SIGPIPE"),
    ],
)
def test_a_command_killed_by_a_signal_names_it(
    limited: Server, command: str, exit_code: int, name: str
) -> None:
    entry = entry_of(limited, command)
    assert entry["exit_code"] == exit_code, entry
    assert cause_of(entry) == {"cause": "signal", "signal": name}


def test_the_segfaulting_program_keeps_its_output(limited: Server) -> None:
    entry = entry_of(limited, compiled(SEGFAULT_C))
    assert entry["stdout"] == "before the crash"


@pytest.mark.parametrize(
    "command",
    [
        PYTHON_HOG,
        compiled(MEMORY_HOG_C),
        # As in a kernel cell: the shell survives its child and re-exits with its status.
        f"{PYTHON_HOG}; status=$?; echo after; exit $status",
    ],
)
def test_a_command_killed_for_memory_says_memory(limited: Server, command: str) -> None:
    entry = entry_of(limited, command)
    assert entry["exit_code"] == 137, entry
    assert cause_of(entry) == {"cause": "memory"}, "memory wins over the OOM killer's SIGKILL"
    assert f"memory limit of {MEMORY_LIMIT_MIB}.0 MiB reached" in entry["stderr"]


def test_the_memory_cause_is_that_commands_only(limited: Server) -> None:
    """The counter is read before and after each command: the next command of the same run
    (a fresh sandbox, same directory) is clean, and a later SIGKILL is a plain signal."""
    first, second, third = limited.run(f"-{PYTHON_HOG}", "echo after", "sh -c 'kill -KILL $$'")[
        "execution"
    ]
    assert cause_of(first) == {"cause": "memory"}
    assert set(second) == CONTRACT_KEYS and second["stdout"] == "after"
    assert cause_of(third) == {"cause": "signal", "signal": "SIGKILL"}


def test_timeouts_say_timeout(limited: Server) -> None:
    answer = limited.run(
        {"command": "-sleep 30", "timeout": 1},
        {"command": "yes", "timeout": 1},  # floods the output cap too: the time wins
    )
    slept, flooded = answer["execution"]
    assert (slept["exit_code"], cause_of(slept)) == (-2, {"cause": "timeout"})
    assert (flooded["exit_code"], cause_of(flooded)) == (-2, {"cause": "timeout"})
    assert "output cut after" in flooded["stderr"]


@pytest.mark.parametrize(
    ("command", "exit_code", "extra"),
    [
        ("head -c 100000 /dev/zero | tr '\\0' a", 0, {"cause": "output"}),
        ("-head -c 100000 /dev/zero | tr '\\0' a; exit 4", 4, {"cause": "output"}),
        ("-head -c 100000 /dev/zero | tr '\\0' a >&2; exit 1", 1, {"cause": "output"}),
        (
            compiled(SEGFAULT_C, "head -c 100000 /dev/zero | tr '\\0' a; ./prog"),
            139,
            {"cause": "signal", "signal": "SIGSEGV"},  # the death, not the cut, ended it
        ),
    ],
)
def test_cut_output_says_output(
    limited: Server, command: str, exit_code: int, extra: dict[str, str]
) -> None:
    entry = entry_of(limited, command)
    assert entry["exit_code"] == exit_code, entry
    assert cause_of(entry) == extra
    assert f"output cut after {MAX_OUTPUT} (--max-output)" in entry["stderr"]


def test_the_streamed_run_gives_the_same_entries(limited: Server) -> None:
    config = {
        "commands": [
            "-echo fine",
            f"-{compiled(SEGFAULT_C)}",
            f"-{PYTHON_HOG}",
            {"command": "-sleep 30", "timeout": 1},
            "head -c 100000 /dev/zero | tr '\\0' a",
        ]
    }

    async def streamed() -> dict[str, Any]:
        async with AsyncSandbox(limited.url, token=limited.token) as sandbox:
            async with sandbox.open_stream(config) as live:
                async for _ in live:
                    pass
            return live.answer

    plain = [cause_of(entry) for entry in limited.execute(config)["execution"]]
    live = [cause_of(entry) for entry in asyncio.run(streamed())["execution"]]
    assert plain == [
        {},
        {"cause": "signal", "signal": "SIGSEGV"},
        {"cause": "memory"},
        {"cause": "timeout"},
        {"cause": "output"},
    ]
    assert live == plain


# -- the kernel's words -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def premierlangage_proxy(limited: Server) -> Iterator[CountingProxy]:
    """The limited server seen as a PremierLangage server with 64 MiB containers: its
    specifications (no ``extensions``, no stream), its execute/ answers without causes."""
    specifications = copy.deepcopy(json.loads(OBSERVED.read_text())["specifications"]["body"])
    specifications["container"]["memory"]["ram"] = MEMORY_LIMIT_MIB * 1024**2
    proxy = CountingProxy(limited.url)
    proxy.premierlangage_specifications = specifications
    proxy.strip_causes = True
    yield proxy
    proxy.close()


def error_of(kernel: KernelSession, code: str) -> tuple[str, str]:
    cell = kernel.run(code)
    assert cell.status == "error", (cell.stdout, cell.stderr)
    return cell.reply["ename"], cell.reply["evalue"]


def test_the_kernel_names_memory_and_signals(limited: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(limited)
    hog = kernel.run(f"echo start; {PYTHON_HOG}")
    assert hog.status == "error"
    assert hog.reply["ename"] == "MemoryLimit"
    assert hog.reply["evalue"].startswith(f"memory limit ({MEMORY_LIMIT_MIB} MiB) reached")
    assert hog.stdout == "start\n"
    [error] = hog.of_type("error")
    assert "--memory-limit" in error["traceback"][-1], "the advice says what sets the limit"
    assert "memory limit" not in hog.stderr, "said by the error, not again by a notice"

    assert error_of(kernel, compiled(SEGFAULT_C)) == (
        "Signal",
        "killed by SIGSEGV (segmentation fault), exit status 139",
    )
    assert error_of(kernel, "python3 -c 'import os; os.abort()'") == (
        "Signal",
        "killed by SIGABRT (aborted), exit status 134",
    )
    assert error_of(kernel, compiled(DIVIDE_BY_ZERO_C)) == (
        "Signal",
        "killed by SIGFPE (floating-point exception), exit status 136",
    )
    assert error_of(kernel, "exit 3") == ("ExitCode", "command exited with status 3")
    cut = kernel.run("head -c 100000 /dev/zero | tr '\\0' a; echo")
    assert cut.status == "ok", "a cut output is a notice, not an error"
    assert "Output cut after 16.0 KiB" in cut.stderr
    assert kernel.run("echo still here").stdout == "still here\n"


def test_without_the_extension_the_kernel_says_probably(
    premierlangage_proxy: CountingProxy, limited: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(limited, SANDBOX_URL=premierlangage_proxy.url)
    assert error_of(kernel, PYTHON_HOG) == (
        "ExitCode",
        "command exited with status 137: probably killed (SIGKILL), often the memory limit "
        f"({MEMORY_LIMIT_MIB} MiB)",
    )
    assert error_of(kernel, compiled(SEGFAULT_C)) == (
        "ExitCode",
        "command exited with status 139: probably a segmentation fault (SIGSEGV)",
    )
    assert error_of(kernel, "python3 -c 'import os; os.abort()'") == (
        "ExitCode",
        "command exited with status 134 (probably killed by SIGABRT: aborted)",
    )
    assert error_of(kernel, "exit 3") == ("ExitCode", "command exited with status 3")
    assert premierlangage_proxy.count("GET", "execute/stream/") == 0
    assert premierlangage_proxy.count("POST", "execute/") == 4, "every cell went through it"

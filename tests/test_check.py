"""``%%sandbox_check`` against the embedded server (a real process over loopback), driven as a
front-end drives it: ``magics.find("sandbox_check").run(context, line, body)``, with the
programs built by real cells of the same session.

Each verdict for a C, a Python and a bash program; each comparison; the table's keys; hidden
cases that never enter the sandbox; the number of ``execute/`` requests counted at a proxy; and
answers shaped as the PremierLangage server shapes them (a real reshaping proxy on loopback).
"""

from __future__ import annotations

import copy
import http.client
import json
import math
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sandbox_kernel import magics
from sandbox_kernel.checking import CHECK_MIME, CheckResult
from sandbox_kernel.magics.core import MagicFailed, MagicResult, MagicUsageError
from sandbox_kernel.session.context import SandboxContext
from sandbox_kernel.session.local_paths import HostPathRefused

from .conftest import Server
from .proxy import CountingProxy

StartServer = Callable[..., Server]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "observed"

# -- the programs checked: one behaviour per first word of stdin --------------------------------

C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    char mode[32] = "";
    if (scanf("%31s", mode) != 1) return 3;
    if (!strcmp(mode, "add")) {
        long a, b;
        if (scanf("%ld %ld", &a, &b) != 2) return 4;
        printf("%ld\n", a + b);
    } else if (!strcmp(mode, "segv")) {
        volatile int *nowhere = NULL;
        *nowhere = 1;
    } else if (!strcmp(mode, "loop")) {
        for (volatile long i = 0;; i++) {}
    } else if (!strcmp(mode, "flood")) {
        for (;;) fputs("flooding the output flooding the output\n", stdout);
    } else if (!strcmp(mode, "fail")) {
        fputs("bad input, giving up\n", stderr);
        return 5;
    } else if (!strcmp(mode, "alloc")) {
        size_t size = (size_t)512 << 20;
        char *block = malloc(size);
        if (block == NULL) { perror("malloc"); return 1; }
        memset(block, 1, size);
        printf("%d\n", block[size - 1]);
    }
    return 0;
}
"""

PY_PROGRAM = r"""
import ctypes, sys
words = sys.stdin.read().split()
mode = words[0] if words else ""
if mode == "add":
    print(int(words[1]) + int(words[2]))
elif mode == "segv":
    ctypes.string_at(0)
elif mode == "loop":
    while True:
        pass
elif mode == "flood":
    while True:
        sys.stdout.write("flooding the output flooding the output\n")
elif mode == "fail":
    sys.exit("bad input, giving up")
elif mode == "alloc":
    block = bytearray(512 << 20)
    print(len(block) >> 29)
"""

SH_PROGRAM = r"""
read -r mode a b
case $mode in
add) echo $((a + b)) ;;
segv) kill -SEGV $$ ;;
loop) while :; do :; done ;;
flood) while :; do echo "flooding the output flooding the output"; done ;;
fail) echo "bad input, giving up" >&2; exit 5 ;;
esac
"""

LANGUAGES = {
    "c": ("./prog", f"cat > prog.c <<'EOF'\n{C_PROGRAM}\nEOF\ngcc -O1 -o prog prog.c"),
    "python": ("python3 prog.py", f"cat > prog.py <<'EOF'\n{PY_PROGRAM}\nEOF"),
    "bash": ("bash prog.sh", f"cat > prog.sh <<'EOF'\n{SH_PROGRAM}\nEOF"),
}

VERDICT_TABLE = """
- name: sum
  stdin: add 2 3
  expect: 5
- name: wrong
  stdin: add 1 1
  expect: 3
- name: slow
  stdin: loop
  expect: never
  timeout: 0.5
- name: crash
  stdin: segv
- name: failing
  stdin: fail
- name: flood
  stdin: flood
"""

EXPECTED_VERDICTS = {
    "sum": "passed",
    "wrong": "wrong output",
    "slow": "time limit",
    "crash": "runtime error",
    "failing": "runtime error",
    "flood": "output limit",
}


def make_context(url: str, token: str | None, folder: Path) -> SandboxContext:
    """A front-end's context started in ``folder`` (its notebook's folder)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return SandboxContext(url=url, token=token)
    finally:
        os.chdir(previous)


def check(context: SandboxContext, line: str, body: str | None = None) -> MagicResult:
    return magics.find("sandbox_check").run(context, line, body)


def result_of(shown: MagicResult) -> CheckResult:
    assert isinstance(shown.value, CheckResult), shown
    return shown.value


def verdicts(result: CheckResult) -> dict[str, str]:
    return {case.name: case.verdict for case in result.cases}


def build(context: SandboxContext, script: str) -> None:
    outcome = context.session.run_cell(script)
    assert outcome.ok, (outcome.stdout, outcome.stderr, outcome.error)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The notebook's folder of the test."""
    path = tmp_path / "notebook"
    path.mkdir()
    return path


@pytest.fixture
def context(server: Server, folder: Path) -> Iterator[SandboxContext]:
    made = make_context(server.url, server.token, folder)
    yield made
    made.close()


@pytest.fixture(scope="module")
def built(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxContext]:
    """One session where the three programs are built (module-wide: gcc runs once)."""
    made = make_context(server.url, server.token, tmp_path_factory.mktemp("built"))
    build(made, "\n".join(script for _, script in LANGUAGES.values()))
    yield made
    made.close()


# -- verdicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_each_verdict(built: SandboxContext, language: str) -> None:
    run, _ = LANGUAGES[language]
    result = result_of(check(built, run, VERDICT_TABLE))
    # Python ignores SIGXFSZ: its flood ends with "OSError: [Errno 27] File too large", exit 1,
    # which must still read as "output limit".
    assert verdicts(result) == EXPECTED_VERDICTS, [
        (c.name, c.verdict, c.detail) for c in result.cases
    ]
    cases = {case.name: case for case in result.cases}
    assert cases["crash"].signal == "SIGSEGV" and "segmentation fault" in cases["crash"].detail
    failing = cases["failing"]
    assert failing.signal is None and failing.exit_code in (1, 5)
    assert "bad input, giving up" in failing.detail
    assert "line 1: expected '3', got '2'" in cases["wrong"].detail
    slow = cases["slow"]
    assert slow.time is not None and 0.4 <= slow.time < 3, slow.time
    assert result.score == 1 and result.total == 6 and not result.passed
    assert result.requests == 1
    text = check(built, run, VERDICT_TABLE).bundles[0]["text/plain"]
    assert "1/6 points" in text and "segmentation fault" in text


@pytest.mark.parametrize("language", ["c", "python"])
def test_memory_limit(built: SandboxContext, language: str) -> None:
    run, _ = LANGUAGES[language]
    table = (
        "- {name: hungry, stdin: alloc, memory: 64}\n"
        "- {name: roomy, stdin: add 1 2, memory: 64, expect: 3}"
    )
    result = result_of(check(built, run, table))
    assert verdicts(result) == {"hungry": "memory limit", "roomy": "passed"}, result.cases
    assert "64 MiB" in result.cases[0].detail
    # Without the limit the same allocation succeeds: the limit was the case's, not the sandbox's.
    unlimited = result_of(check(built, run, "- {stdin: alloc, expect: 1, timeout: 10}"))
    assert verdicts(unlimited) == {"case 1": "passed"}, unlimited.cases


def test_not_found(built: SandboxContext) -> None:
    for run in ("./no_such_program", "no-such-command", "bash no_such_script.sh"):
        result = result_of(check(built, run, "- {stdin: add 1 2, expect: 3}"))
        assert verdicts(result) == {"case 1": "not found"}, (run, result.cases)
        assert result.cases[0].exit_code == 127


def test_stop_on_failure_runs_nothing_after_the_first_failure(built: SandboxContext) -> None:
    table = """
stop_on_failure: true
cases:
  - {name: first, stdin: add 1 1, expect: 2}
  - {name: second, stdin: add 1 1, expect: 3}
  - {name: third, stdin: loop, timeout: 1}
  - {name: fourth, stdin: add 2 2, expect: 4}
"""
    result = result_of(check(built, "./prog", table))
    assert verdicts(result) == {
        "first": "passed", "second": "wrong output", "third": "not run", "fourth": "not run"
    }  # fmt: skip
    assert result.cases[2].time is None and result.cases[3].time is None
    assert "not run" in result.as_json()["cases"][3]["verdict"]


def test_compilation_error_through_a_teaching_cells_check(
    context: SandboxContext, folder: Path
) -> None:
    (folder / "tests").mkdir()
    (folder / "tests" / "sum.yaml").write_text(
        "- {stdin: 2 3, expect: 5}\n- {stdin: 1 1, expect: 2, hidden: true}\n"
    )
    teaching = magics.find("c").run(
        context, "--check tests/sum.yaml", "int main(void) { return missing; }"
    )
    assert teaching.script is not None and teaching.then is not None
    compiled = context.session.run_cell(teaching.script)
    assert not compiled.ok and "missing" in compiled.stderr
    result = result_of(teaching.then(compiled))
    assert verdicts(result) == {"case 1": "compilation error", "case 2": "compilation error"}
    assert result.score == 0 and result.total == 2
    good = magics.find("c").run(
        context,
        "--check tests/sum.yaml",
        '#include <stdio.h>\nint main(void) { int a, b; scanf("%d %d", &a, &b); '
        'printf("%d\\n", a + b); }',
    )
    assert good.script is not None and good.then is not None
    compiled = context.session.run_cell(good.script)
    assert compiled.ok and compiled.stdout == "", compiled.stdout  # compiled, not run
    result = result_of(good.then(compiled))
    assert result.passed and result.score == 2


# -- comparisons ---------------------------------------------------------------------------------


def test_each_comparison(context: SandboxContext) -> None:
    """``cat`` echoes stdin: each comparison passes what it should and fails the rest."""
    table = r"""
- {name: exact, stdin: "a b", expect: "a b\n", compare: exact}
- {name: exact missing newline, stdin: "a b", expect: "a b", compare: exact}
- {name: exact extra space, stdin: "a b ", expect: "a b\n", compare: exact}
- {name: trailing, stdin: "5  \n\n\n", expect: "5"}
- {name: trailing inner space, stdin: "5 6", expect: "5  6"}
- {name: trailing leading space, stdin: " 5", expect: "5"}
- {name: tokens, stdin: "1   2\n3\t", expect: "1 2 3", compare: tokens}
- {name: tokens wrong, stdin: "1 2 3", expect: "1 2 4", compare: tokens}
- {name: tokens count, stdin: "1 2", expect: "1 2 3", compare: tokens}
- {name: float, stdin: "3.14159 2.0", expect: "3.1416 2", compare: float, tolerance: 0.001}
- {name: float tight, stdin: "3.14159 2.0", expect: "3.1416 2", compare: float}
- {name: float words, stdin: "pi 3.0", expect: "pi 3", compare: float}
- {name: regex, stdin: "result: 42", expect_regex: "result: \\d+"}
- {name: regex whole, stdin: "result: 42 and more", expect_regex: "result: \\d+"}
- {name: regex wrong, stdin: "result: abc", expect_regex: "result: \\d+"}
"""
    result = result_of(check(context, "cat", table))
    assert verdicts(result) == {
        "exact": "passed",
        "exact missing newline": "wrong output",
        "exact extra space": "wrong output",
        "trailing": "passed",
        "trailing inner space": "wrong output",
        "trailing leading space": "wrong output",
        "tokens": "passed",
        "tokens wrong": "wrong output",
        "tokens count": "wrong output",
        "float": "passed",
        "float tight": "wrong output",
        "float words": "passed",
        "regex": "passed",
        "regex whole": "wrong output",
        "regex wrong": "wrong output",
    }, [(c.name, c.verdict, c.detail) for c in result.cases]
    details = {case.name: case.detail for case in result.cases}
    assert "word 3: expected '4', got '3'" in details["tokens wrong"]
    assert "3 words expected, got 2" in details["tokens count"]
    assert "result: \\d+" in details["regex wrong"]
    assert (
        "compare: exact" in details["exact extra space"] or "line 1" in details["exact extra space"]
    )


def test_stdin_gets_a_final_newline_and_no_stdin_is_empty(context: SandboxContext) -> None:
    table = r"""
- {name: added, stdin: "x", expect: "x\n", compare: exact}
- {name: kept, stdin: "x\n", expect: "x\n", compare: exact}
- {name: none, expect: "", compare: exact}
"""
    result = result_of(check(context, "cat", table))
    assert result.passed, [(c.name, c.verdict, c.detail) for c in result.cases]
    counted = result_of(check(context, "wc -c", "- {stdin: abc, expect: 4}"))
    assert counted.passed, counted.cases


def test_args_env_files_and_defaults(context: SandboxContext) -> None:
    build(
        context,
        """cat > show.sh <<'EOF'
printf '<%s>' "$@"; echo
echo "${GREETING:-unset}"
cat data.txt 2>/dev/null || echo nofile
EOF""",
    )
    table = r"""
defaults:
  points: 2
  timeout: 3
  env: {GREETING: hello}
cases:
  - name: args
    args: ["a b", "c", 3]
    expect: "<a b><c><3>\nhello\nnofile"
  - name: env
    env: {GREETING: "it's me"}
    expect: "<>\nit's me\nnofile"
  - name: files
    files: {data.txt: "from the table"}
    points: 5
    expect: "<>\nhello\nfrom the table"
"""
    result = result_of(check(context, "bash show.sh", table))
    assert result.passed, [(c.name, c.verdict, c.detail) for c in result.cases]
    assert [case.points for case in result.cases] == [2, 2, 5]
    assert result.score == result.total == 9


def test_run_from_the_table_and_the_first_line_overriding_it(context: SandboxContext) -> None:
    build(context, "printf 'echo one\\n' > one.sh; printf 'echo two\\n' > two.sh")
    table = "run: bash one.sh\ncases:\n  - {expect: one}\n"
    assert result_of(check(context, "", table)).passed
    overridden = result_of(check(context, "bash two.sh", table))
    assert verdicts(overridden) == {"case 1": "wrong output"}
    assert overridden.run == "bash two.sh" and overridden.cases[0].got == "two\n"


def test_expect_file_next_to_the_table_and_the_notebook(
    context: SandboxContext, folder: Path
) -> None:
    (folder / "greeting.out").write_text("hello from the notebook's folder\n")
    (folder / "tests").mkdir()
    (folder / "tests" / "greeting.out").write_text("hello from the tests folder\n")
    (folder / "tests" / "table.yaml").write_text(
        "- {stdin: hello from the tests folder, expect_file: greeting.out}\n"
    )
    in_cell = result_of(
        check(
            context, "cat", "- {stdin: hello from the notebook's folder, expect_file: greeting.out}"
        )
    )
    assert in_cell.passed, in_cell.cases
    from_file = result_of(check(context, "--tests tests/table.yaml cat"))
    assert from_file.passed, from_file.cases


def test_local_paths_outside_are_refused(
    context: SandboxContext, folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "outside.out").write_text("secret\n")
    (tmp_path / "outside.yaml").write_text("- {expect: secret}\n")
    (folder / "tests").mkdir()
    (folder / "tests" / "escape.yaml").write_text("- {expect_file: ../../outside.out}\n")
    with pytest.raises((MagicUsageError, HostPathRefused)) as refused:
        check(context, "cat", "- {expect_file: ../outside.out}")
    assert "outside the notebook's folder" in str(refused.value)
    assert "SANDBOX_ALLOW_HOST_PATHS" in str(refused.value) or "allow" in str(refused.value)
    with pytest.raises((MagicUsageError, HostPathRefused)) as refused:
        check(context, f"--tests {tmp_path / 'outside.yaml'} cat")
    assert "outside the notebook's folder" in str(refused.value)
    with pytest.raises(MagicUsageError) as refused:
        check(context, "--tests tests/escape.yaml cat")
    assert "outside the table's folder" in str(refused.value)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("- {stdin: 1, expcet: 2}", "'expcet'"),
        ("- {stdin: 1, expect: 2, Timeout: 3}", "'Timeout'"),
        ("defaults: {tiemout: 1}\ncases:\n  - {expect: 1}", "'tiemout'"),
        ("stop_on_fail: true\ncases:\n  - {expect: 1}", "'stop_on_fail'"),
        ("- {stdin: [unclosed", "not valid YAML"),
        ("- {stdin: 1, expect: 2}\n  bad indentation: [", "not valid YAML"),
        ("just a sentence", "must be a list of cases"),
        ("- {compare: fuzzy, expect: 1}", "fuzzy"),
        ("- {expect: 1, expect_regex: '1'}", "expect and expect_regex"),
        ("- {timeout: 3600, expect: 1}", "timeout"),
    ],
)
def test_bad_tables_are_usage_errors_that_send_nothing(
    context: SandboxContext, server: Server, body: str, named: str
) -> None:
    proxy = CountingProxy(server.url)
    try:
        counted = make_context(proxy.url, server.token, Path(context.local_dir))
        with pytest.raises(MagicUsageError) as error:
            check(counted, "cat", body)
        assert named in str(error.value)
        assert proxy.count("POST", "execute/") == 0
        counted.close()
    finally:
        proxy.close()


def test_no_program_named_is_a_usage_error(context: SandboxContext) -> None:
    with pytest.raises(MagicUsageError) as error:
        check(context, "", "- {expect: 1}")
    assert "first line" in str(error.value) and "run:" in str(error.value)
    with pytest.raises(MagicUsageError) as error:
        check(context, "cat", "")
    assert "--tests" in str(error.value)


# -- the session is not changed ------------------------------------------------------------------


def test_the_check_runs_in_the_cells_state_and_changes_nothing(context: SandboxContext) -> None:
    build(
        context,
        'printf \'pwd; echo "${GREETING:-unset}" "${local_only:-unset}"; cat here.txt; '
        "touch made-by-the-check; cd /; export GREETING=changed\\n' > where.sh",
    )
    build(
        context,
        "mkdir -p work && cd work && export GREETING=exported && local_only=1\n"
        "echo mark > here.txt",
    )
    before = context.session.environment
    table = '- {expect: "/home/student/work\\nexported unset\\nmark"}'
    result = result_of(check(context, "bash ../where.sh", table))
    assert result.passed, result.cases
    assert context.session.environment == before, "the check saved a new environment"
    after = context.session.run_cell("pwd; echo $GREETING $local_only; ls")
    assert after.stdout == "/home/student/work\nexported 1\nhere.txt\n", after.stdout


def test_shell_syntax_on_the_first_line_is_run_or_refused(context: SandboxContext) -> None:
    """``%%sandbox_check ./prog | sort`` must not silently become ``./prog '|' sort``."""
    build(context, "mkdir -p sub && printf 'echo 2; echo 1\\n' > sub/two.sh")
    for line in ("cd sub && bash two.sh | sort", "bash sub/two.sh | sort"):
        try:
            result = result_of(check(context, line, '- {expect: "1\\n2"}'))
        except MagicUsageError as error:  # refused, saying where shell syntax goes
            assert "run:" in str(error), error
        else:
            # The first line is kept as written, operators and all.
            assert result.passed, (line, result.run, result.cases)


# -- hidden cases never enter the sandbox --------------------------------------------------------

CHEAT = r"""
pattern='(expected|stdin)-[0-9a-f]{16}'
found=$( {
    grep -rhoEs -- "$pattern" "$HOME" /tmp /var/tmp "$PWD"
    env | grep -oE -- "$pattern"
    cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n' |
        grep -oE -- "$pattern"
} | sort -u)
echo "$found" | grep '^expected-' | tr '\n' ' ' ; echo
echo "$found" | grep '^stdin-' | tr '\n' ' ' ; echo
"""


def test_expected_outputs_never_enter_the_sandbox(context: SandboxContext) -> None:
    """A program that searches its working directory, /tmp, its environment and every
    process's command line and environment for anything shaped like an expected output finds
    none (and fails), while it does find its own stdin there: the search works."""
    build(context, f"cat > cheat.sh <<'EOF'\n{CHEAT}\nEOF")
    tokens = {
        name: f"expected-{secrets.token_hex(8)}" for name in ("hidden", "visible", "regex", "file")
    }
    control = f"stdin-{secrets.token_hex(8)}"
    (Path(context.local_dir) / "hidden.out").write_text(tokens["file"] + "\n")
    table = f"""
- {{name: hidden, stdin: {control}, expect: {tokens["hidden"]}, hidden: true}}
- {{name: visible, stdin: {control}, expect: {tokens["visible"]}}}
- {{name: regex, stdin: {control}, expect_regex: "{tokens["regex"]}"}}
- {{name: file, stdin: {control}, expect_file: hidden.out, hidden: true}}
"""
    result = result_of(check(context, "bash cheat.sh", table))
    assert set(verdicts(result).values()) == {"wrong output"}, result.cases
    for case in result.cases:  # a hidden case keeps no data, not even in the result object
        expected_got = None if case.hidden else f"\n{control} \n"
        assert case.got == expected_got, (case.name, case.got)


# -- requests per table --------------------------------------------------------------------------


def test_twenty_cases_take_one_request(server: Server, folder: Path) -> None:
    proxy = CountingProxy(server.url)
    counted = make_context(proxy.url, server.token, folder)
    try:
        build(counted, "true")
        before = proxy.count("POST", "execute/")
        table = "\n".join(f"- {{stdin: '{n}', expect: '{n}'}}" for n in range(20))
        shown = check(counted, "cat", table)
        result = result_of(shown)
        assert result.passed and len(result.cases) == 20
        assert proxy.count("POST", "execute/") - before == 1
        assert result.requests == 1 and result.request_budget == 60
        assert "requests" not in shown.bundles[0]["text/plain"]
    finally:
        counted.close()
        proxy.close()


def test_cases_that_do_not_fit_take_as_few_requests_as_fit(
    start_server: StartServer, folder: Path
) -> None:
    server = start_server("--execute-timeout", "5")
    proxy = CountingProxy(server.url)
    counted = make_context(proxy.url, server.token, folder)
    try:
        build(counted, "printf 'sleep 0.8; cat\\n' > slow.sh")
        for count in (3, 7):
            before = proxy.count("POST", "execute/")
            table = "\n".join(
                f"- {{stdin: '{n}', expect: '{n}', timeout: 1}}" for n in range(count)
            )
            shown = check(counted, "bash slow.sh", table)
            result = result_of(shown)
            assert result.passed, [(c.name, c.verdict, c.detail) for c in result.cases]
            expected = math.ceil(count / 3)
            assert proxy.count("POST", "execute/") - before == expected
            assert result.requests == expected
            text = shown.bundles[0]["text/plain"]
            if expected > 1:
                assert f"{expected} requests" in text and "5 s per request" in text, text
        with pytest.raises(MagicUsageError) as error:
            check(counted, "cat", "- {name: long, expect: 1, timeout: 4.5}")
        assert "'long'" in str(error.value) and "5 s" in str(error.value)
    finally:
        counted.close()
        proxy.close()


# -- PremierLangage-shaped answers ---------------------------------------------------------------


def _reference(name: str) -> Any:
    recorded = json.loads((REFERENCE / "reference-3.0.3-responses.json").read_text())
    return copy.deepcopy(recorded[name]["body"])


SPECS_2X = {
    "sandbox_version": "2.0.3",
    "docker_version": "18.09.7",
    "containers": {"total": 5, "running": 0, "available": 5},
    "cpu": {"count": 1, "period": 1000, "shares": 1024, "quota": 0, "name": "cpu"},
    "memory": {"ram": "100m", "swap": "200m", "storage": "host"},
    "environ": {},
    "execute_timeout": 10.0,
    "expiration": 86400,
}


class PremierLangageProxy:
    """Our server behind a reshaping proxy: answers as the public server gives them.

    ``specifications/`` is the recorded 3.0.3 answer (no ``execute_timeout``) or a 2.x one;
    ``execute/`` answers keep only the protocol's fields, with ``stdout`` and ``stderr``
    stripped, ``result`` stripped only in 2.x, status -3 when the result file is missing, and
    ``unknown`` set: the next ``execute/`` is answered -1 "unknown error" (the public server
    under churn). Every ``execute/`` is counted."""

    def __init__(self, target: str, version: int) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.version = version
        self.executes = 0
        self.unknown = False
        self.results: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/specifications/":
                    body = _reference("specifications") if proxy.version == 3 else SPECS_2X
                    self._answer(200, json.dumps(body).encode())
                elif self.path.startswith("/execute/stream"):
                    self._answer(404, b"Not Found", "text/html")
                else:
                    self._answer(*proxy.forward("GET", self.path, None, dict(self.headers)))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(*proxy.forward("POST", self.path, body, dict(self.headers)))

            def do_HEAD(self) -> None:
                status, _, kind = proxy.forward("HEAD", self.path, None, dict(self.headers))
                self._answer(status, b"", kind)

            def _answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, str]:
        headers = {k: v for k, v in headers.items() if k.lower() != "host"}
        if path == "/execute/":
            self.executes += 1
            if self.unknown:
                self.unknown = False
                return 200, json.dumps(_unknown_error()).encode(), "application/json"
        upstream = http.client.HTTPConnection(self.host, self.port, timeout=120)
        upstream.request(method, path, body=body, headers=headers)
        answer = upstream.getresponse()
        data, kind = answer.read(), answer.getheader("Content-Type") or "text/plain"
        upstream.close()
        if path == "/execute/" and answer.status == 200:
            data = json.dumps(self.reshape(json.loads(data))).encode()
        return answer.status, data, kind

    def reshape(self, answer: dict[str, Any]) -> dict[str, Any]:
        shaped: dict[str, Any] = {"status": answer["status"], "execution": []}
        for entry in answer.get("execution", []):
            shaped["execution"].append({
                "command": entry["command"],
                "exit_code": entry["exit_code"],
                "stdout": entry["stdout"].strip(),
                "stderr": entry["stderr"].strip(),
                "time": entry["time"],
            })  # fmt: skip
        shaped["total_time"] = answer.get("total_time", 0.1)
        for key in ("environment", "expire"):
            if key in answer:
                shaped[key] = answer[key]
        if "result" in answer:
            result = answer["result"]
            shaped["result"] = result.strip() if self.version == 2 else result
            self.results.append(shaped["result"])
        return shaped

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _unknown_error() -> dict[str, Any]:
    return {
        "status": -1,
        "execution": [{
            "command": "bash .sandbox_check/harness.sh",
            "exit_code": -1,
            "stdout": "",
            "stderr": "An unknown error occurred on the sandbox",
            "time": 0.06,
        }],
        "total_time": 0.06,
    }  # fmt: skip


@pytest.mark.parametrize("version", [3, 2])
def test_premierlangage_shaped_answers(
    built: SandboxContext, server: Server, folder: Path, version: int
) -> None:
    proxy = PremierLangageProxy(server.url, version)
    shaped = make_context(proxy.url, server.token, folder)
    try:
        build(shaped, "\n".join(script for _, script in LANGUAGES.values()))
        assert shaped.session.server_timeout() in (None, 10.0)
        before = proxy.executes
        result = result_of(check(shaped, "./prog", VERDICT_TABLE))
        assert verdicts(result) == EXPECTED_VERDICTS, [
            (c.name, c.verdict, c.detail) for c in result.cases
        ]
        # 2 s + 0.15 s a case in a 9 s budget: four cases a request; "slow" (0.5 s) joins.
        assert proxy.executes - before == result.requests == 2
        assert result.request_budget == 10
        if version == 2:
            assert all(not r.endswith("\n") for r in proxy.results)
        else:
            assert proxy.results[-1].endswith("\n")
        many = "\n".join(f"- {{stdin: add {n} 1, expect: '{n + 1}'}}" for n in range(10))
        before = proxy.executes
        shown = check(shaped, "./prog", many)
        assert result_of(shown).passed and proxy.executes - before == 3
        assert "3 requests" in shown.bundles[0]["text/plain"]
        assert "10 s per request" in shown.bundles[0]["text/plain"]
        # The public server under churn: -1 "unknown error" is said clearly, then it works.
        proxy.unknown = True
        with pytest.raises(MagicFailed) as error:
            check(shaped, "./prog", "- {stdin: add 1 1, expect: 2}")
        message = str(error.value)
        assert "status -1" in message and "unknown error" in message and "again" in message
        assert result_of(check(shaped, "./prog", "- {stdin: add 1 1, expect: 2}")).passed
    finally:
        shaped.close()
        proxy.close()


def test_a_deleted_record_is_a_clear_error(built: SandboxContext) -> None:
    """A program that removes the check's record (status -3 on any server): the check says
    so and how to go on, instead of judging every case ``not run``."""
    with pytest.raises(MagicFailed) as error:
        check(built, "bash -c 'rm -rf ~/.sandbox_check'", "- {expect: 1}")
    message = str(error.value)
    assert "status -3" in message and "again" in message


def test_the_json_output_is_the_result(built: SandboxContext) -> None:
    shown = check(built, "./prog", VERDICT_TABLE)
    data = shown.bundles[0][CHECK_MIME]
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["score"] == 1 and data["total"] == 6 and data["passed"] is False
    assert [case["verdict"] for case in data["cases"]] == list(EXPECTED_VERDICTS.values())
    assert data["cases"][3]["signal"] == "SIGSEGV"


JAVA_PROGRAM = """
public class Hungry {
    public static void main(String[] args) {
        java.util.Scanner in = new java.util.Scanner(System.in);
        String mode = in.next();
        if (mode.equals("alloc")) {
            byte[] block = new byte[200 << 20];
            System.out.println(block.length >> 20);
        } else {
            System.out.println(in.nextInt() + in.nextInt());
        }
    }
}
"""


def test_java_gets_xmx_instead_of_ulimit(context: SandboxContext) -> None:
    """A JVM reserves far more address space than it uses: under ``ulimit -v 64M`` it would not
    even start. With ``memory: 64`` it gets ``-Xmx64m``: it starts, and a 200 MiB array is a
    ``memory limit``."""
    found = context.session.run_cell("command -v java javac")
    assert found.ok, "java and javac are missing from the sandbox (Debian: default-jdk-headless)"
    build(context, f"cat > Hungry.java <<'EOF'\n{JAVA_PROGRAM}\nEOF\njavac Hungry.java")
    table = """
- {name: small, stdin: add 2 3, expect: 5, memory: 64, timeout: 8}
- {name: hungry, stdin: alloc, memory: 64, timeout: 8}
- {name: unlimited, stdin: alloc, expect: 200, timeout: 8}
"""
    result = result_of(check(context, "java -Xmx512m -cp . Hungry", table))
    assert verdicts(result) == {
        "small": "passed", "hungry": "memory limit", "unlimited": "passed"
    }, [(c.name, c.verdict, c.detail) for c in result.cases]  # fmt: skip


def test_the_notebook_variables_reach_the_program_never_the_harness(
    context: SandboxContext,
) -> None:
    """``%sandbox_env`` variables are the program's. A ``BASH_ENV`` among them, given to the
    harness, would run the notebook's code there: a ``wait`` that hides every crash."""
    build(
        context,
        "printf 'wait() { builtin wait \"$@\"; return 0; }\\n' > hook.sh\n"
        "printf 'echo \"$COURSE\"\\nkill -SEGV $$\\n' > crash.sh",
    )
    context.session.environ.update(BASH_ENV="/home/student/hook.sh", COURSE="systems 101")
    result = result_of(check(context, "bash crash.sh", "- {expect: systems 101}"))
    [case] = result.cases
    assert (case.verdict, case.signal, case.got) == ("runtime error", "SIGSEGV", "systems 101\n")

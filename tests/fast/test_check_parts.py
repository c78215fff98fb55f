"""The pure parts of checking: tables, comparisons, differences, the harness's record (as a
submission could forge it), batch planning, the generated commands and the views."""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import tarfile
from pathlib import Path

import pytest

from sandbox_kernel.checking import CHECK_MIME, CaseResult, CheckResult, TableError, parse_table
from sandbox_kernel.checking.harness import (
    HarnessError,
    Planned,
    build_request,
    plan_batches,
    program_command,
    read_record,
)
from sandbox_kernel.checking.table import Case, load_table
from sandbox_kernel.checking.verdicts import compare, difference, judge
from sandbox_kernel.views.checks import check_bundle


def refuse(name: str) -> Path:
    raise ValueError(f"{name!r} may not be read here")


def parse(text: str, run: str | None = None) -> list[Case]:
    return list(parse_table(text, run=run, resolve=refuse).cases)


# -- tables --------------------------------------------------------------------------------------


def test_a_list_and_a_mapping_with_defaults() -> None:
    cases = parse('- {stdin: "2 3", expect: 5}\n- name: negative\n  expect: 6\n  points: 2')
    assert [(c.name, c.stdin, c.expect, c.points) for c in cases] == [
        ("case 1", "2 3", "5", 1.0), ("negative", None, "6", 2.0)
    ]  # fmt: skip
    assert cases[0].compare == "trailing" and cases[0].tolerance == 1e-6
    assert cases[0].timeout == 2.0 and cases[0].memory is None and not cases[0].hidden
    table = parse_table(
        "run: ./sum\nstop_on_failure: true\ndefaults: {timeout: 1, points: 3}\n"
        "cases:\n  - {expect: 1}\n  - {expect: 2, points: 0}",
        resolve=refuse,
    )
    assert table.run == "./sum" and table.stop_on_failure and table.total == 3
    assert [(c.timeout, c.points) for c in table.cases] == [(1.0, 3.0), (1.0, 0.0)]
    assert table.with_run("./other").run == "./other" and table.with_run(None).run == "./sum"
    assert (
        parse_table("run: ./sum\ncases: [{expect: 1}]", run="./mine", resolve=refuse).run
        == "./mine"
    )


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("- {stdin: 1, expcet: 2}", ["case 1", "unknown key 'expcet'", "expect_regex"]),
        ("- {name: big, Timeout: 3}", ["unknown key 'Timeout'"]),
        ("defaults: {tiemout: 1}\ncases: [{expect: 1}]", ["defaults", "'tiemout'"]),
        ("stop_on_fail: true\ncases: [{expect: 1}]", ["'stop_on_fail'", "stop_on_failure"]),
        ("- {stdin: [unclosed", ["not valid YAML"]),
        ("\t- a", ["not valid YAML"]),
        ("", ["empty"]),
        ("just words", ["must be a list of cases", "string"]),
        ("- 3", ["case 1", "mapping"]),
        ("cases: []", ["non-empty list"]),
        ("run: 3\ncases: [{expect: 1}]", ["run must be a command"]),
        ("stop_on_failure: yes please\ncases: [{expect: 1}]", ["true or false"]),
        ("defaults: {name: x}\ncases: [{expect: 1}]", ["defaults cannot give a name"]),
        ("- {expect: 1, expect_regex: '1'}", ["expect and expect_regex"]),
        ("- {expect_regex: '(unclosed'}", ["not a valid regular expression"]),
        ("- {compare: fuzzy}", ["compare must be one of", "'fuzzy'"]),
        ("- {points: -1}", ["points", "at least 0"]),
        ("- {timeout: 0}", ["timeout"]),
        ("- {timeout: .nan}", ["timeout"]),
        ("- {timeout: true}", ["timeout must be a number"]),
        ("- {memory: 0}", ["memory"]),
        ("- {hidden: 1}", ["hidden must be true or false"]),
        ("- {args: --big}", ["args must be a list"]),
        ("- {args: [[1]]}", ["list of strings"]),
        ("- {env: {not-a-name: 1}}", ["'not-a-name' is not a variable name"]),
        ("- {env: [A]}", ["env must be a mapping"]),
        ("- {files: {../up.txt: x}}", ["relative file name"]),
        ("- {files: {/etc/passwd: x}}", ["relative file name"]),
        ("- {stdin: {a: 1}}", ["stdin must be a string"]),
        ("- {name: twice}\n- {name: twice}", ["two cases are named 'twice'"]),
        ("- {name: ''}", ["name must be a non-empty string"]),
        ("- {expect_file: answer.out}", ["expect_file", "may not be read here"]),
    ],
)
def test_bad_tables_say_what_and_where(text: str, said: list[str]) -> None:
    with pytest.raises(TableError) as error:
        parse(text)
    for words in said:
        assert words in str(error.value), (words, str(error.value))


def test_numbers_are_taken_as_written() -> None:
    case = parse("- {stdin: 2 3, expect: 5, args: [1, 2.5], env: {N: 7}, files: {a.txt: 8}}")[0]
    assert (case.expect, case.args, case.env, case.files) == (
        "5",
        ("1", "2.5"),
        (("N", "7"),),
        (("a.txt", "8"),),
    )


def test_expect_file_of_a_table_file_is_read_next_to_it(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "big.out").write_text("big answer\n")
    (tmp_path / "secret.out").write_text("not for tables\n")
    (tmp_path / "tests" / "ok.yaml").write_text("- {expect_file: big.out, hidden: true}\n")
    (tmp_path / "tests" / "escape.yaml").write_text("- {expect_file: ../secret.out}\n")
    (tmp_path / "tests" / "absolute.yaml").write_text(
        f"- {{expect_file: {tmp_path / 'secret.out'}}}\n"
    )
    (tmp_path / "tests" / "missing.yaml").write_text("- {expect_file: nowhere.out}\n")
    table = load_table(tmp_path / "tests" / "ok.yaml", run="./big")
    assert table.cases[0].expect == "big answer\n" and table.run == "./big"
    assert table.cases[0].expect_file == "big.out"
    for name in ("escape", "absolute"):
        with pytest.raises(TableError, match="outside the table's folder"):
            load_table(tmp_path / "tests" / f"{name}.yaml")
    with pytest.raises(TableError, match="cannot be read"):
        load_table(tmp_path / "tests" / "missing.yaml")
    with pytest.raises(TableError, match="cannot be read"):
        load_table(tmp_path / "tests" / "no-such-table.yaml")


# -- comparisons and differences -----------------------------------------------------------------


def verdict(text: str, got: str) -> tuple[str, str]:
    case = parse(text)[0]
    kept = Planned(0, case).keep
    return compare(case, got, len(got.encode()), kept)


@pytest.mark.parametrize(
    ("text", "got", "passed"),
    [
        ("- {expect: '5', compare: exact}", "5", True),
        ("- {expect: '5', compare: exact}", "5\n", False),
        ("- {expect: '5', compare: exact}", "5 ", False),
        ("- {expect: '5'}", "5  \n\n\n", True),
        ('- {expect: "a\\nb"}', "a \nb\t\n", True),
        ('- {expect: "a\\nb"}', " a\nb", False),
        ("- {expect: 'a b'}", "a  b", False),
        ('- {expect: "a\\nb"}', "a\r\nb\r\n", True),
        ("- {expect: '1 2 3', compare: tokens}", "1\n2\t 3\n", True),
        ("- {expect: '1 2 3', compare: tokens}", "1 2", False),
        ("- {expect: '3.1416 x', compare: float, tolerance: 0.001}", "3.14159 x", True),
        ("- {expect: '3.1416', compare: float}", "3.14159", False),
        ("- {expect: '1e3', compare: float}", "1000.0000000001", True),
        ("- {expect: 'nan', compare: float}", "nan", True),
        ("- {expect: 'inf', compare: float}", "inf", True),
        ("- {expect: 'x', compare: float}", "y", False),
        ("- {expect: '1 2', compare: float}", "1", False),
        ("- {expect_regex: '\\d+ apples'}", "12 apples\n", True),
        ("- {expect_regex: '\\d+ apples'}", "12 apples and pears", False),
        ("- {expect_regex: '(?s)a.*z'}", "a\nb\nz\n", True),
        ("- {}", "anything at all", True),
    ],
)
def test_comparisons(text: str, got: str, passed: bool) -> None:
    assert (verdict(text, got)[0] == "passed") is passed, verdict(text, got)


def test_differences_are_compact_and_say_where() -> None:
    assert difference("3", "2", "trailing") == "line 1: expected '3', got '2'"
    many = difference("a\nb\nc\nd", "a\nB\nc\nd", "trailing")
    assert many.startswith("line 2: expected 'b', got 'B'")
    assert "-b" in many and "+B" in many and len(many.splitlines()) <= 10
    assert "fewer than the 3 expected" in difference("a\nb\nc", "a\nb", "trailing")
    assert "compare: exact" in difference("a\n", "a \n", "exact") or "line 1" in difference(
        "a\n", "a \n", "exact"
    )
    assert difference("1 2 3", "1 2 4", "tokens") == "word 3: expected '3', got '4'"
    assert difference("1.5 2", "1.5 2.1", "float", 0.01) == "word 2: expected '2', got '2.1'"
    assert difference("1 2 3", "1 2", "tokens") == "3 words expected, got 2"
    long = difference("x" * 500, "y" * 500, "trailing")
    assert len(long) < 200 and "..." in long
    huge = difference(
        "\n".join(map(str, range(1000))), "\n".join(map(str, range(1, 1001))), "trailing"
    )
    assert len(huge.splitlines()) <= 10


def test_a_too_long_output_is_wrong_without_reading_it() -> None:
    case = parse("- {expect: '5'}")[0]
    kept = Planned(0, case).keep
    assert compare(case, "5", 10 * kept, kept)[0] == "wrong output"
    assert "bytes of output" in compare(case, "5", 10 * kept, kept)[1]


# -- the record, as the harness writes it and as a submission could forge it ---------------------


def batch(*expects: str) -> list[Planned]:
    return [Planned(i, Case(f"c{i}", expect=e)) for i, e in enumerate(expects)]


def record(
    cases: list[tuple[int, int, float, float]],
    outs: list[bytes],
    errs: list[bytes] | None = None,
    killed: tuple[int, ...] = (),
) -> str:
    """A record as the harness writes it: begin/end lines (and the watchdog's), then the
    outputs' line."""
    lines = []
    for index, status, begin, end in cases:
        lines.append(json.dumps({"case": index, "begin": begin}))
        if index in killed:
            lines.append(json.dumps({"case": index, "killed": "time"}))
        lines.append(json.dumps({"case": index, "status": status, "end": end}))
    errs = errs or []
    ran = " ".join(str(c[0]) for c in cases)
    failed = " ".join(str(c[0]) for c in cases if c[1] != 0)
    sizes = " ".join(str(len(b)) for b in outs + errs) + " "
    data = base64.b64encode(gzip.compress(b"".join(outs + errs))).decode()
    tail = {"ran": ran, "failed": failed, "gzip": 1, "sizes": sizes, "data": data}
    return "\n".join([*lines, json.dumps(tail)]) + "\n"


def test_a_good_record_is_read() -> None:
    planned = batch("5", "6")
    text = record([(0, 0, 10.0, 10.25), (1, 139, 11.0, 11.5)], [b"5\n", b"partial"], [b"boom\n"])
    raws = read_record(text, planned)
    assert raws[0].status == 0 and raws[0].time == 0.25 and raws[0].stdout == b"5\n"
    assert raws[1].status == 139 and raws[1].stdout == b"partial" and raws[1].stderr == b"boom\n"
    judged = judge(planned[1], raws[1], request_timed_out=False)
    assert judged.verdict == "runtime error" and judged.signal == "SIGSEGV"
    assert judged.detail == "segmentation fault (SIGSEGV)"
    # Stripped as 2.x strips ``result``, and with stray lines: the same.
    assert read_record(text.strip() + "\nnot json\n[1]\n", planned)[0].stdout == b"5\n"


@pytest.mark.parametrize(
    "forged",
    [
        '{"error": "the sandbox has no timeout command (coreutils)"}',
        '{"ran": "0", "failed": "", "sizes": "x", "data": ""}',
        '{"ran": "0", "failed": "", "sizes": "1", "data": "!!!not base64"}',
        '{"ran": "0", "failed": "", "sizes": "1", "data": "'
        + base64.b64encode(b"not gzip").decode()
        + '"}',
        '{"ran": "0 1 2", "failed": "", "sizes": "1", "data": ""}',
        '{"ran": "7", "failed": "", "sizes": "1", "data": ""}',
        '{"ran": "0", "failed": "", "sizes": "100", "data": "'
        + base64.b64encode(gzip.compress(b"x")).decode()
        + '"}',
        '{"ran": "0", "failed": "", "data": ""}',
    ],
)
def test_a_garbled_record_is_a_harness_error(forged: str) -> None:
    text = (
        json.dumps({"case": 0, "begin": 1.0})
        + "\n"
        + json.dumps({"case": 0, "status": 0, "end": 2.0})
    )
    with pytest.raises(HarnessError):
        read_record(text + "\n" + forged + "\n", batch("5"))


def test_a_gzip_bomb_is_not_inflated() -> None:
    bomb = base64.b64encode(gzip.compress(b"x" * 50_000_000)).decode()
    text = (
        json.dumps({"case": 0, "begin": 1.0})
        + "\n"
        + json.dumps({"case": 0, "status": 0, "end": 2.0})
        + '\n{"ran": "0", "failed": "", "sizes": "50000000", "data": "' + bomb + '"}\n'
    )  # fmt: skip
    with pytest.raises(HarnessError):  # inflates no more than it keeps, then sees the lie
        read_record(text, batch("5"))


@pytest.mark.parametrize(
    "lines",
    [
        ['{"case": 0, "begin": 1}', '{"case": 0, "status": 0, "end": 1e999}'],
        ['{"case": 0, "begin": -1e999}', '{"case": 0, "status": 0, "end": 2}'],
        ['{"case": 0, "begin": 1}', '{"case": 0, "status": 0, "end": NaN}'],
        ['{"case": 0, "begin": 1}', '{"case": 0, "status": 0, "end": Infinity}'],
    ],
)
def test_a_forged_time_stays_a_number_json_can_carry(lines: list[str]) -> None:
    """A submission can append lines to its record; whatever it writes, the result must still
    be JSON that Jupyter can send (its messages are dumped with ``allow_nan=False``)."""
    planned = batch("5")
    raws = read_record("\n".join(lines) + "\n", planned)
    judged = judge(planned[0], raws.get(0), request_timed_out=False)
    assert judged.time is None or math.isfinite(judged.time), judged.time
    json.dumps(CheckResult("./x", [judged]).as_json(), allow_nan=False)


def test_forged_lines_for_other_cases_are_ignored() -> None:
    planned = batch("5")
    text = (
        '{"case": 9, "begin": 1}\n{"case": "0", "status": 0, "end": 2}\n'
        '{"case": true, "status": 0}\n'
    )
    assert read_record(text, planned) == {}
    raws = read_record('{"case": 0, "status": "0", "end": 2}\n', planned)
    assert raws[0].status is None


def test_cases_without_a_record() -> None:
    planned = batch("5")[0]
    assert judge(planned, None, request_timed_out=False).verdict == "not run"
    began = read_record('{"case": 0, "begin": 1}\n', [planned])[0]
    assert judge(planned, began, request_timed_out=True).verdict == "time limit"
    assert judge(planned, began, request_timed_out=False).verdict == "not run"


@pytest.mark.parametrize(
    ("status", "stderr", "expected", "signal"),
    [
        (124, b"", "runtime error", None),
        (137, b"", "memory limit", "SIGKILL"),
        (153, b"", "output limit", "SIGXFSZ"),
        (127, b"bash: ./sum: No such file or directory\n", "not found", None),
        (1, b"Traceback...\nMemoryError\n", "memory limit", None),
        (
            1,
            b"Exception in thread main java.lang.OutOfMemoryError: Java heap space\n",
            "memory limit",
            None,
        ),
        (1, b"malloc: Cannot allocate memory\n", "memory limit", None),
        (134, b"", "runtime error", "SIGABRT"),
        (136, b"", "runtime error", "SIGFPE"),
        (3, b"", "runtime error", None),
    ],
)
def test_statuses_to_verdicts(
    status: int, stderr: bytes, expected: str, signal: str | None
) -> None:
    planned = batch("5")[0]
    raw = read_record(record([(0, status, 1.0, 1.1)], [b""], [stderr]), [planned])[0]
    judged = judge(planned, raw, request_timed_out=False)
    assert (judged.verdict, judged.signal) == (expected, signal), judged
    if expected == "runtime error" and signal is None:
        assert judged.exit_code == status and f"exit code {status}" in judged.detail


def test_a_case_the_watchdog_stopped_is_a_time_limit() -> None:
    planned = Planned(0, Case("slow", timeout=1.0))
    for status in (137, 143, 0):
        errs = [b"Terminated"] if status else []
        raw = read_record(record([(0, status, 1.0, 2.1)], [b""], errs, killed=(0,)), [planned])[0]
        judged = judge(planned, raw, request_timed_out=False)
        assert (judged.verdict, judged.signal, judged.detail) == ("time limit", None, "over 1 s")


# -- batches -------------------------------------------------------------------------------------


def cases(count: int, timeout: float = 2.0, expect: str = "x") -> list[Case]:
    return [Case(f"c{n}", expect=expect, timeout=timeout) for n in range(count)]


@pytest.mark.parametrize(
    ("count", "timeout", "budget", "requests"),
    [
        (20, 2.0, 59.0, 1),  # our server: 60 s
        (27, 2.0, 59.0, 1),
        (28, 2.0, 59.0, 2),
        (10, 2.0, 9.0, 3),  # the public server: 10 s
        (7, 1.0, 4.0, 3),  # --execute-timeout 5
        (3, 1.0, 4.0, 1),
        (1, 8.5, 9.0, 1),
    ],
)
def test_batches(count: int, timeout: float, budget: float, requests: int) -> None:
    planned = plan_batches(cases(count, timeout), budget)
    assert len(planned) == requests
    assert [p.index for b in planned for p in b] == list(range(count))
    assert all(sum(p.cost for p in b) <= budget for b in planned)


def test_a_case_that_fits_no_request_names_itself() -> None:
    with pytest.raises(ValueError, match=r"'c0'.*10 s"):
        plan_batches(cases(1, 9.5), 9.0)


def test_large_expected_outputs_split_batches() -> None:
    big = "y" * 300_000
    planned = plan_batches(cases(4, 0.5, big), 59.0)
    assert len(planned) >= 2
    assert all(max(p.keep for p in b) * len(b) <= 640 * 1024 for b in planned)


# -- what is sent --------------------------------------------------------------------------------


def sent(*table: Case, run: str = "./sum") -> str:
    """Everything one request of ``table`` sends: its config and its archive's members."""
    request = build_request(
        [Planned(i, c) for i, c in enumerate(table)], run, state_file="state.sh",
        environment=None, environ={}, request_timeout=60, stop_on_failure=False,
    )  # fmt: skip
    assert request.config["save"] is False
    parts = [json.dumps(request.config)]
    if request.archive is not None:
        with tarfile.open(fileobj=io.BytesIO(request.archive)) as archive:
            for member in archive.getmembers():
                extracted = archive.extractfile(member)
                parts += [member.name, (extracted.read() if extracted else b"").decode()]
    return "\n".join(parts)


@pytest.mark.parametrize("padding", [0, 200_000])  # inline, and uploaded as a file
def test_expected_outputs_are_never_sent(padding: int) -> None:
    text = sent(
        Case("a", stdin="in-token" + "p" * padding, expect="expected-token", hidden=True),
        Case("b", expect_regex="regex-token"),
        Case("c", expect="file-token", expect_file="c.out", files=(("data.txt", "data-token"),)),
    )
    for token in ("expected-token", "regex-token", "file-token", "c.out"):
        assert token not in text, token
    assert "in-token" in text and "data-token" in text


def test_program_commands() -> None:
    assert program_command("./sum", ["a b", "$HOME"], None) == ("./sum 'a b' '$HOME'", False)
    assert program_command("python3 sum.py", [], 64) == ("python3 sum.py", False)
    java, is_java = program_command("java -Xmx512m -cp . Main", ["1"], 64)
    assert is_java and java == "java -Xmx64m -cp . Main 1"
    assert program_command("/usr/bin/java Main", [], None) == ("/usr/bin/java Main", True)
    shell, _ = program_command("cd sub && ./sum", ["x"], None)
    assert shell == "bash -c 'cd sub && ./sum \"$@\"' bash x"
    script = sent(Case("j", memory=64), Case("k", memory=64), run="java -cp . Main")
    assert "-Xmx64m" in script and "ulimit -v" not in script
    assert "ulimit -v 65536" in sent(Case("c", memory=64), run="./sum")


# -- what is shown -------------------------------------------------------------------------------


def test_hidden_cases_show_their_verdict_only() -> None:
    hidden = CaseResult(
        name="secret case", verdict="wrong output", points=2, hidden=True, time=0.01, exit_code=0,
        detail="line 1: expected 'EXPECTED-T', got 'GOT-T'", got="GOT-T\n", expected="EXPECTED-T",
        stderr="STDERR-T",
    )  # fmt: skip
    visible = CaseResult(name="open", verdict="passed", points=1, score=1, time=0.002, exit_code=0,
                         got="7\n", expected="7")  # fmt: skip
    bundle = check_bundle(CheckResult("./sum", [visible, hidden], requests=1))
    shown = bundle["text/plain"] + bundle["text/html"] + json.dumps(bundle[CHECK_MIME])
    for token in ("EXPECTED-T", "GOT-T", "STDERR-T"):
        assert token not in shown, token
    assert "secret case" in bundle["text/plain"] and "wrong output" in bundle["text/plain"]
    assert "1/3 points" in bundle["text/plain"] and "1/2 cases passed" in bundle["text/plain"]
    data = bundle[CHECK_MIME]
    assert data["cases"][1]["verdict"] == "wrong output" and data["cases"][1]["hidden"] is True
    assert data["cases"][0]["got"] == "7\n"


def test_html_escapes_what_a_program_printed() -> None:
    case = CaseResult(name="<b>n</b>", verdict="wrong output", points=1, got="<script>x</script>",
                      expected="&", detail="<img>")  # fmt: skip
    page = check_bundle(CheckResult("./x", [case]))["text/html"]
    assert "<script>" not in page and "<img>" not in page and "<b>n</b>" not in page
    assert "&lt;script&gt;" in page


# -- what the review found -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a\x85  b", "\x9b\x7f\ufffe", "é 😀 \u2028 end", "tab\there"])
def test_an_inlined_table_reads_back_the_same(text: str) -> None:
    """``grade`` sends tables as ``inline()`` text: JSON, read as JSON (YAML would turn
    U+0085 into a space and refuse U+009B)."""
    table = parse_table(
        json.dumps({"run": "./x", "cases": [{"stdin": text, "expect": text, "tolerance": 0}]}),
        resolve=refuse,
    )
    again = parse_table(table.inline(), resolve=refuse)
    assert again == table and again.cases[0].expect == text
    assert again.cases[0].tolerance == 0  # 0 is a tolerance, not "the default"


def test_aliases_and_deep_nesting_are_refused_quickly() -> None:
    levels = ["&x0 [a,a,a,a,a,a,a,a,a]"]
    levels += [f"&x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    with pytest.raises(TableError, match="aliases"):
        parse("- name: a\n  args: [" + ", ".join(levels) + "]\n")
    with pytest.raises(TableError, match=r"nested too deeply|not valid YAML"):
        parse("- args: " + "[" * 50_000)
    with pytest.raises(TableError) as refused:  # a big wrong value is named briefly
        parse("- args: [" + ", ".join(["[1, 2, 3]"] * 10_000) + "]")
    assert len(str(refused.value)) < 400


def test_a_record_line_nested_deeply_is_ignored() -> None:
    planned = batch("5")
    text = record([(0, 0, 1.0, 1.1)], [b"5\n"])
    raws = read_record('{"case":' + "[" * 200_000 + "\n" + text, planned)
    assert judge(planned[0], raws[0], request_timed_out=False).verdict == "passed"


def test_a_case_over_its_time_is_a_time_limit_even_if_the_watchdog_was_fooled() -> None:
    """A program can rewrite the watchdog's file; its time still gives it away."""
    planned = Planned(0, Case("slow", timeout=1.0, expect="5"))
    raw = read_record(record([(0, 0, 1.0, 4.0)], [b"5\n"]), [planned])[0]
    assert judge(planned, raw, request_timed_out=False).verdict == "time limit"


def test_hidden_cases_keep_no_data_even_when_they_did_not_run() -> None:
    from sandbox_kernel.checking import compilation_failed
    from sandbox_kernel.checking.verdicts import not_run

    case = Case("secret", expect="THE HIDDEN ANSWER", hidden=True)
    assert not_run(case).expected is None
    table = parse_table('- {expect: "THE HIDDEN ANSWER", hidden: true}', run="./x", resolve=refuse)
    assert compilation_failed(table).cases[0].expected is None


def test_a_backtracking_pattern_gives_up_with_a_verdict() -> None:
    case = Case("r", expect_regex="(a|aa)+c")
    verdict, detail = compare(case, "a" * 60 + "!", 61, 16384)
    assert verdict == "wrong output" and "took over" in detail


def test_trailing_splits_lines_at_newlines_only() -> None:
    case = Case("t", expect="a\nb")
    for sneaky in ("a\x1cb", "a\x85b", "a\u2028b", "a\x0bb"):
        assert compare(case, sneaky, len(sneaky), 100)[0] == "wrong output", repr(sneaky)
    assert compare(case, "a \t\r\nb\r\n\n", 10, 100)[0] == "passed"


def test_the_session_variables_go_to_the_cases_not_to_the_harness() -> None:
    request = build_request(
        [Planned(0, Case("a"))], "./sum", state_file=None, environment=None,
        environ={"BASH_ENV": "/home/student/hook.sh", "COURSE": "c 101"},
        request_timeout=60, stop_on_failure=False,
    )  # fmt: skip
    assert "environ" not in request.config  # bash would read BASH_ENV before the harness
    command = request.config["commands"][0]["command"]
    assert "export BASH_ENV=/home/student/hook.sh" in command
    assert "export COURSE='c 101'" in command


def test_java_behind_shell_syntax_gets_its_heap_limit_without_ulimit() -> None:
    script = sent(Case("j", memory=64), run="cd j && java -cp . Main")
    assert "export JAVA_TOOL_OPTIONS=-Xmx64m" in script and "ulimit -v" not in script


def test_a_timeout_that_fits_no_request_says_the_most_it_may_be() -> None:
    with pytest.raises(ValueError, match=r"at most 58\.85 s"):
        plan_batches(cases(1, timeout=58.9), 59)
    with pytest.raises(ValueError, match=r"at most 298\.85 s"):
        plan_batches(cases(1, timeout=299), 299)


def test_an_expect_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.out")
    (tmp_path / "t.yaml").write_text("- {expect_file: pipe.out}\n")
    with pytest.raises(TableError, match="not a regular file"):
        load_table(tmp_path / "t.yaml")


def test_control_characters_of_an_output_are_shown_as_escapes() -> None:
    result = CheckResult("./x", [CaseResult("c", "wrong output", 1, got="\x1b[2Jboom\r!")])
    text = check_bundle(result)["text/plain"]
    assert "\x1b" not in text and "\\x1b[2Jboom\\r!" in text

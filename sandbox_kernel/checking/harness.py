"""The harness: a generated bash script that runs a batch of cases in the sandbox and records
what happened, and the reading of that record.

Expected outputs never enter the sandbox. The harness gets the command, each case's stdin,
arguments, variables and files (in the uploaded archive) and records, per case, its exit
status and start and end times, then the first bytes of its stdout and the end of its stderr,
gzip-compressed and base64-encoded; the record is the request's ``result_path`` (contract,
"POST execute/": its content is returned as ``result``, as text, so everything in it is ASCII).
The kernel compares (:mod:`.verdicts`).

Cost matters: a check must not be much slower than the same runs written by hand. The
harness is the command itself (no archive to extract), each case's stdin a here-document in it.
Per case the harness forks once, a subshell that restores the cell's shell state, sets the
limits and execs the program; the outputs of the whole batch are read at the end with four or
five processes (``stat``, ``head``, ``tail``, ``base64``, and ``gzip`` past 16 KiB) whatever
the number of cases. Time limits are kept by one watchdog for the batch (a loop of bash
builtins ticking every 20 ms on ``read -t`` from a FIFO), not a ``timeout`` process per case,
which cost almost a millisecond each: past its ``timeout`` a case's process group gets SIGTERM,
then SIGKILL, and the record says so.

Each case runs as a cell would: in the shell state the last cell left (current directory,
variables; the state file of :mod:`sandbox_kernel.session.cellscript`, sourced in the case's
own subshell so that nothing of it reaches the harness), with ``ulimit -c 0`` (no core files),
``ulimit -f`` (its output limit: the kernel reads ``SIGXFSZ`` as ``output limit``) and
``ulimit -v`` for ``memory`` (a JVM gets ``-Xmx`` instead: it reserves far more address space
than it uses). Bash 5 is needed (``EPOCHREALTIME``); Debian has had it since 2019.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import re
import secrets
import shlex
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from .table import Case

#: Seconds added to each case's timeout in a request's budget: the watchdog sends SIGKILL
#: this long after SIGTERM, ticks every 20 ms, and starting a case takes a few milliseconds.
KILL_GRACE = 0.1
CASE_OVERHEAD = 0.05
#: Bytes of stdout kept beyond the expected output's length (trailing spaces, a few more
#: lines: enough to show what is wrong); a case without an expected text keeps this much.
KEEP_SLACK = 4096
KEEP_UNEXPECTED = 16 * 1024
#: Bytes of the end of stderr returned for a failing case (its error message).
STDERR_TAIL = 2048
#: Raw bytes of output one request may return. Our server returns a result file of up to
#: 1 MiB (``--max-result``); base64 adds a third, and gzip seldom adds anything.
RESULT_BUDGET = 640 * 1024
#: A case's output limit (``ulimit -f``) when its expected output is small.
OUTPUT_LIMIT = 8 * 1024**2
#: Where a batch's files go in the working directory: not saved (``save`` is false).
CHECK_DIR = ".sandbox_check"
#: Bytes of harness sent as the command itself; a larger one is uploaded.
INLINE_LIMIT = 96 * 1024
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A JVM run without a shell, whose ``-Xmx`` :func:`program_command` sets itself.
_PLAIN_JAVA = re.compile(r"(\S*/)?java -Xmx")
#: A program word that needs no shell: run with ``exec`` directly, saving a bash start.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./+,:@%-]+")


class HarnessError(Exception):
    """The harness could not run or its record cannot be read; the message says why."""


@dataclasses.dataclass(frozen=True)
class Planned:
    """A case of the table and its place in it."""

    index: int
    case: Case

    @property
    def keep(self) -> int:
        """Bytes of stdout to bring back: enough to compare and to show a difference."""
        if self.case.expect is None:
            return KEEP_UNEXPECTED
        return len(self.case.expect.encode()) + KEEP_SLACK

    @property
    def output_limit(self) -> int:
        return max(OUTPUT_LIMIT, 2 * self.keep)

    @property
    def cost(self) -> float:
        """Seconds of the request's budget the case may take."""
        return self.case.timeout + KILL_GRACE + CASE_OVERHEAD


def plan_batches(cases: Sequence[Case], budget: float) -> list[list[Planned]]:
    """The cases in as few requests as fit: each request's cases must fit ``budget`` seconds
    (the server's ``execute_timeout`` less a second) and :data:`RESULT_BUDGET` bytes of
    output. A case that fits no request alone raises :class:`ValueError`."""
    batches: list[list[Planned]] = []
    current: list[Planned] = []
    for index, case in enumerate(cases):
        planned = Planned(index, case)
        if planned.cost > budget:
            raise ValueError(
                f"case {case.name!r}: its timeout of {case.timeout:g} s does not fit the "
                f"sandbox's time limit per request ({budget + 1:g} s, less 1 s for the "
                f"harness): give it a timeout of at most {_most(budget):g} s"
            )
        if current and not _fits([*current, planned], budget):
            batches.append(current)
            current = []
        current.append(planned)
    if current:
        batches.append(current)
    return batches


def _most(budget: float) -> float:
    """The longest timeout a case may have in a request of ``budget`` seconds."""
    return max(math.floor(round((budget - KILL_GRACE - CASE_OVERHEAD) * 100, 6)) / 100, 0.0)


def _fits(batch: list[Planned], budget: float) -> bool:
    keep = max(planned.keep for planned in batch)
    return sum(p.cost for p in batch) <= budget and keep * len(batch) <= RESULT_BUDGET


@dataclasses.dataclass
class HarnessRequest:
    """One ``execute/`` request of a check: its config and the archive to upload."""

    config: dict[str, Any]
    #: The harness as a file to upload, when it is too large for a command.
    archive: bytes | None
    nonce: str
    batch: list[Planned]


def build_request(
    batch: list[Planned],
    run: str,
    *,
    state_file: str | None,
    environment: str | None,
    environ: dict[str, str],
    request_timeout: float,
    stop_on_failure: bool,
) -> HarnessRequest:
    """The ``execute/`` of ``batch``: never saved, so the session's environment is unchanged.

    The harness, with each case's stdin and files in it, is the command itself when it is
    small (an uploaded archive costs our server a sandboxed extraction, tens of milliseconds);
    a larger one is uploaded as a file, since a command is one ``bash -c`` argument, which
    Linux caps at 128 KiB.
    """
    nonce = secrets.token_hex(8)
    folder = f"{CHECK_DIR}/{nonce}"
    script = _script(batch, run, nonce, state_file, stop_on_failure, environ)
    archive = None
    command = script
    if len(script.encode()) > INLINE_LIMIT:
        archive = _archive({f"{folder}/harness.sh": script.encode()})
        command = f"bash {folder}/harness.sh"
    config: dict[str, Any] = {
        "commands": [{"command": command, "timeout": request_timeout}],
        "result_path": f"{folder}/result",
        "save": False,
    }
    if environment:
        config["environment"] = environment
    return HarnessRequest(config, archive, nonce, batch)


def _archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- the script --------------------------------------------------------------------------------

_PROLOGUE = r"""# sandbox-kernel: runs the cases of a check and records what happened (no expected
# output is here: the kernel compares).
h_root=$PWD
h_dir=$PWD/@FOLDER@
h_result=$h_dir/result
h_state=@STATE@
h_ran=() h_failed=()
mkdir -p "$h_dir/out" "$h_dir/err" && mkfifo "$h_dir/tick" && : >"$h_result" || exit 0
if [ -z "${EPOCHREALTIME:-}" ]; then
    printf '{"error":"the sandbox runs bash %s; checks need bash 5 or later"}\n' \
        "$BASH_VERSION" >"$h_result"
    exit 0
fi
h_now() { h_t=${EPOCHREALTIME/,/.}; }
h_watch() {  # stops the case that overran its time: SIGTERM, then SIGKILL
    local pid=0 deadline=0 index now killed= _
    exec 9<>"$h_dir/tick" </dev/null >/dev/null 2>&1
    while kill -0 "$h_main" 2>/dev/null; do
        read -r -t 0.02 -u 9 _  # a tick without a process: nothing ever writes there
        [ -s "$h_dir/current" ] || continue
        read -r pid deadline index <"$h_dir/current" || continue
        now=${EPOCHREALTIME/[.,]/}
        if ((now > deadline + @GRACE@)); then
            kill -KILL -- "-$pid"
        elif ((now > deadline)) && [ "$killed" != "$pid" ]; then
            killed=$pid
            printf '{"case":%s,"killed":"time"}\n' "$index" >>"$h_result"
            kill -TERM -- "-$pid"
        fi
    done
}
h_finish() {  # the first bytes of each stdout, the end of each failing stderr
    local outs=() errs=() sizes i total=0 pack=(base64 -w0)
    kill "$h_watcher" 2>/dev/null
    for i in "${h_ran[@]}"; do outs+=("$h_dir/out/$i"); done
    for i in "${h_failed[@]}"; do errs+=("$h_dir/err/$i"); done
    sizes=$(stat -c %s -- "${outs[@]}" "${errs[@]}")
    for i in $sizes; do total=$((total + i)); done
    ((total > 16384)) && pack=(eval 'gzip -1 -c | base64 -w0')
    {
        printf '{"ran":"%s","failed":"%s","gzip":%d,"sizes":"%s","data":"' \
            "${h_ran[*]}" "${h_failed[*]}" $((total > 16384)) "${sizes//$'\n'/ }"
        {
            head -q -c @KEEP@ -- "${outs[@]}"
            if ((${#errs[@]})); then tail -q -c @TAIL@ -- "${errs[@]}"; fi
        } | "${pack[@]}"
        printf '"}\n'
    } >>"$h_result" 2>/dev/null
}
set -m  # each case in its own process group, which the watchdog stops whole
h_main=$$
h_watch &
h_watcher=$!
"""

# A case: its subshell sources the last cell's shell state at its top level (in a function,
# ``declare`` would make the variables local), then execs the program in the background, so
# that the watchdog can stop its process group.
_CASE = r"""h_now; printf '{"case":@I@,"begin":%s}\n' "$h_t" >>"$h_result"
(
    cd "$h_root" || exit 126
    if [ -n "$h_state" ]; then . "$h_root/$h_state"; fi >/dev/null 2>&1
@SETUP@    exec @COMMAND@ >"$h_dir/out/@I@" 2>"$h_dir/err/@I@" @STDIN@
) &
printf '%s %s %s\n' $! $((${h_t/./} + @MICROSECONDS@)) @I@ >"$h_dir/current"
wait $!
h_status=$?
: >"$h_dir/current"
kill -KILL -- "-$!" 2>/dev/null  # what the case left running in its group
h_now; printf '{"case":@I@,"status":%d,"end":%s}\n' "$h_status" "$h_t" >>"$h_result"
h_ran+=(@I@)
if [ "$h_status" != 0 ]; then h_failed+=(@I@)@STOP@; fi
"""


def _script(
    batch: list[Planned],
    run: str,
    nonce: str,
    state_file: str | None,
    stop: bool,
    environ: dict[str, str],
) -> str:
    prologue = _fill(
        _PROLOGUE,
        FOLDER=f"{CHECK_DIR}/{nonce}",
        STATE=shlex.quote(f".sandbox_kernel/{state_file}") if state_file else "''",
        KEEP=str(max(planned.keep for planned in batch)),
        TAIL=str(STDERR_TAIL),
        GRACE=str(round(KILL_GRACE * 1e6)),
    )
    cases = [_case_lines(planned, run, stop, environ) for planned in batch]
    return prologue + "".join(cases) + "h_finish\n"


def _fill(template: str, **values: str) -> str:
    """``template`` with each ``@NAME@`` replaced, in one pass: text of a table (a variable's
    value, a file) that looks like a placeholder is never replaced."""
    return re.sub(r"@([A-Z]+)@", lambda found: values[found.group(1)], template)


def _case_lines(planned: Planned, run: str, stop: bool, environ: dict[str, str]) -> str:
    """A case's lines. The session's variables (``%sandbox_env``) are exported here, in the
    case's subshell after its shell state, never given to the harness as the request's
    ``environ``: a ``BASH_ENV`` there would run code of the notebook inside the harness."""
    case = planned.case
    setup = _file_lines(case.files)
    variables = [*environ.items(), *case.env]
    setup += [f"export {name}={shlex.quote(value)}" for name, value in variables
              if _VARIABLE.fullmatch(name)]  # fmt: skip
    limits = f"ulimit -c 0; ulimit -f {-(-planned.output_limit // 1024)}"
    command, java = program_command(run, case.args, case.memory)
    if case.memory is not None and java and not _PLAIN_JAVA.match(command):
        setup.append(f"export JAVA_TOOL_OPTIONS=-Xmx{case.memory}m")  # after any of the cell's
    if case.memory is not None and not java:
        limits += f"; ulimit -v {case.memory * 1024}"
    setup.append(limits)
    return _fill(
        _CASE,
        SETUP="".join(f"    {line}\n" for line in setup),
        MICROSECONDS=str(round(case.timeout * 1e6)),
        COMMAND=command,
        STOP="; h_finish; exit 0" if stop else "",
        I=str(planned.index),
        STDIN=_here_document(case.stdin),
    )


def _here_document(stdin: str | None) -> str:
    """The case's stdin as a quoted here-document (a final newline added), or none."""
    if stdin is None:
        return "</dev/null"
    text = stdin if stdin.endswith("\n") else stdin + "\n"
    delimiter = f"SANDBOX_STDIN_{secrets.token_hex(6)}"
    while delimiter in text:
        delimiter = f"SANDBOX_STDIN_{secrets.token_hex(6)}"
    return f"<<'{delimiter}'\n{text}{delimiter}"


def _file_lines(files: tuple[tuple[str, str], ...]) -> list[str]:
    """Bash that writes the case's files in its working directory (builtins, and one
    ``mkdir`` for those in folders)."""
    folders = sorted({name.rsplit("/", 1)[0] for name, _ in files if "/" in name})
    lines = [f"mkdir -p -- {' '.join(shlex.quote(f) for f in folders)}"] if folders else []
    return lines + [f"printf %s {shlex.quote(content)} >{shlex.quote(name)}"
                    for name, content in files]  # fmt: skip


def program_command(run: str, args: Sequence[str], memory: int | None) -> tuple[str, bool]:
    """The words that run ``run`` with ``args``, and whether it is a JVM (given ``-Xmx``).

    A plain command (``./sum``, ``python3 sum.py``) is exec'd directly; anything with shell
    syntax runs through ``bash -c``, the arguments passed as ``"$@"``.
    """
    try:
        words = shlex.split(run)
    except ValueError:
        words = []
    plain = bool(words) and all(_PLAIN_WORD.fullmatch(word) for word in words)
    plain = plain and "=" not in words[0]
    java = any(word.rsplit("/", 1)[-1] == "java" for word in words)
    if plain and java and memory is not None and words[0].rsplit("/", 1)[-1] == "java":
        words = [words[0], f"-Xmx{memory}m", *[w for w in words[1:] if not w.startswith("-Xmx")]]
    if plain:
        return " ".join([*words, *(shlex.quote(arg) for arg in args)]), java
    script = shlex.quote(f'{run} "$@"')
    return " ".join(["bash -c", script, "bash", *(shlex.quote(arg) for arg in args)]), java


# -- the record --------------------------------------------------------------------------------


@dataclasses.dataclass
class RawCase:
    """What the harness recorded of one case."""

    index: int
    began: bool = False
    status: int | None = None
    time: float | None = None
    #: The first bytes of stdout (:attr:`Planned.keep` of the batch at most), and its size.
    stdout: bytes = b""
    stdout_size: int = 0
    stderr: bytes = b""
    #: The watchdog stopped it at its timeout.
    timed_out: bool = False


def read_record(result: str | None, batch: list[Planned]) -> dict[int, RawCase]:
    """The harness's record of ``batch``, by case index: cases that never began are absent.

    The record was written in the sandbox, where the submission runs too: every field is
    checked, and a record that does not add up raises :class:`HarnessError`.
    """
    indexes = {planned.index for planned in batch}
    raws: dict[int, RawCase] = {}
    begins: dict[int, float] = {}
    tail: dict[str, Any] | None = None
    for line in _lines(result or ""):
        if "error" in line:
            raise HarnessError(f"the check could not run: {str(line['error'])[:300]}")
        if "data" in line:
            tail = line
            continue
        index = line.get("case")
        if not isinstance(index, int) or index not in indexes:
            continue
        raw = raws.setdefault(index, RawCase(index))
        raw.began = True
        if line.get("killed") == "time":
            raw.timed_out = True
        elif _is_number(line.get("begin")):
            begins[index] = float(line["begin"])
        elif _is_status(line.get("status")) and _is_number(line.get("end")):
            raw.status = line["status"]
            if index in begins:
                raw.time = max(0.0, round(float(line["end"]) - begins[index], 4))
    if tail is not None:
        _read_outputs(tail, raws, batch)
    return raws


def _lines(result: str) -> Iterator[dict[str, Any]]:
    for text in result.splitlines():
        if not text.startswith('{"'):
            continue  # not a line of the harness (a program may write anything there)
        try:
            line = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(line, dict):
            yield line


def _is_number(value: object) -> bool:
    """A finite JSON number (a forged ``1e999`` is read as infinity by ``json``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_status(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= 255


def _read_outputs(tail: dict[str, Any], raws: dict[int, RawCase], batch: list[Planned]) -> None:
    """Split the batch's outputs: ``head -q`` and ``tail -q`` pieces, in the listed order."""
    keep = max(planned.keep for planned in batch)
    try:
        ran = [int(word) for word in str(tail["ran"]).split()]
        failed = [int(word) for word in str(tail["failed"]).split()]
        sizes = [int(word) for word in str(tail["sizes"]).split()]
        data = base64.b64decode(str(tail["data"]), validate=True)
    except (KeyError, ValueError, binascii.Error):
        raise HarnessError("the check's record of outputs is garbled") from None
    if len(sizes) != len(ran) + len(failed) or any(i not in raws for i in ran + failed):
        raise HarnessError("the check's record lists outputs of cases that did not run")
    pieces = [min(size, keep) for size in sizes[: len(ran)]]
    pieces += [min(size, STDERR_TAIL) for size in sizes[len(ran) :]]
    blob = _gunzip(data, sum(pieces)) if tail.get("gzip") == 1 else data
    if len(blob) != sum(pieces):
        raise HarnessError("the check's outputs changed while they were read")
    view = memoryview(blob)
    for position, index in enumerate(ran):
        raws[index].stdout = bytes(view[: pieces[position]])
        raws[index].stdout_size = sizes[position]
        view = view[pieces[position] :]
    for position, index in enumerate(failed, len(ran)):
        raws[index].stderr = bytes(view[: pieces[position]])
        view = view[pieces[position] :]


def _gunzip(data: bytes, expected: int) -> bytes:
    """Decompress at most ``expected`` bytes (and one more, to notice a longer stream)."""
    if not data:
        return b""
    try:
        inflater = zlib.decompressobj(wbits=31)
        return inflater.decompress(data, expected + 1)
    except zlib.error:
        raise HarnessError("the check's record of outputs is not gzip data") from None

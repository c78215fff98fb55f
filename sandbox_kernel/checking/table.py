"""Test tables: what a teacher writes (YAML), read into checked, immutable cases.

A table is a YAML list of cases, or a mapping ``{run, stop_on_failure, defaults, cases}``.
Every key is checked here, before anything is sent: an unknown key, a wrong type or a file
that cannot be read is a :class:`TableError` naming the case and the key, so a typo never
turns into a silently passing check. The expected outputs stay on this machine: the sandbox
only ever gets what :mod:`.harness` sends (commands, stdin, files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import regex as patterns
import yaml

#: The comparisons a case may ask for (``compare:``).
COMPARISONS = ("exact", "trailing", "tokens", "float")
CASE_KEYS = (
    "name",
    "stdin",
    "args",
    "env",
    "files",
    "expect",
    "expect_file",
    "expect_regex",
    "compare",
    "tolerance",
    "points",
    "hidden",
    "timeout",
    "memory",
)
TABLE_KEYS = ("run", "stop_on_failure", "defaults", "cases")
#: Seconds a case may run when the table does not say (CodeRunner and Judge0 give a few
#: seconds; 2 s lets 29 cases share one request of our server's 60 s budget).
DEFAULT_TIMEOUT = 2.0
DEFAULT_TOLERANCE = 1e-6
#: Bounds that keep a table (a notebook's, so anyone's) from exhausting this machine.
MAX_TABLE_BYTES = 4 * 1024**2
MAX_EXPECTED_BYTES = 16 * 1024**2
MAX_CASES = 1000

#: A number with an exponent, which PyYAML (YAML 1.1) leaves a string unless it has a dot.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
#: Resolves a local file a table names (``expect_file``) to a path that may be read, or
#: raises (a path outside the places the user allowed).
Resolver = Callable[[str], Path]


class TableError(ValueError):
    """A test table that cannot be used: the message names the case and key, and what to
    write instead. Nothing was sent to the sandbox."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One case of a table, with the defaults applied."""

    name: str
    stdin: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    expect: str | None = None
    expect_regex: str | None = None
    #: The ``expect_file`` as written (its content is in :attr:`expect`).
    expect_file: str | None = None
    compare: str = "trailing"
    tolerance: float = DEFAULT_TOLERANCE
    points: float = 1.0
    hidden: bool = False
    timeout: float = DEFAULT_TIMEOUT
    #: MiB of memory (``ulimit -v``, or ``-Xmx`` for Java); None: the sandbox's own limit.
    memory: int | None = None

    def as_data(self) -> dict[str, Any]:
        """The case as table keys, self-contained (an ``expect_file`` inlined)."""
        data: dict[str, Any] = {"name": self.name}
        for key in ("stdin", "expect", "expect_regex", "memory"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.args:
            data["args"] = list(self.args)
        if self.env:
            data["env"] = dict(self.env)
        if self.files:
            data["files"] = dict(self.files)
        data.update(compare=self.compare, tolerance=self.tolerance, points=self.points)
        data.update(hidden=self.hidden, timeout=self.timeout)
        return data


@dataclasses.dataclass(frozen=True)
class CheckTable:
    """A checked table: the command to run, its cases, and whether to stop at a failure."""

    cases: tuple[Case, ...]
    run: str | None = None
    #: CodeRunner's "hide rest if fail": the cases after the first failing one are not run.
    stop_on_failure: bool = False

    @property
    def total(self) -> float:
        """The points of the whole table."""
        return sum(case.points for case in self.cases)

    def with_run(self, run: str | None) -> CheckTable:
        """This table with ``run`` overriding its own (the magic's first line)."""
        return dataclasses.replace(self, run=run) if run else self

    def inline(self) -> str:
        """The table as one self-contained text (JSON, which YAML reads), files inlined: the
        body of a ``%%sandbox_check`` cell that needs no local file (``sandbox-kernel grade``
        sends hidden tables this way, through the kernel, never into the sandbox)."""
        table: dict[str, Any] = {"stop_on_failure": self.stop_on_failure}
        if self.run:
            table["run"] = self.run
        table["cases"] = [case.as_data() for case in self.cases]
        return json.dumps(table, indent=1, ensure_ascii=False)


def load_table(path: Path, run: str | None = None) -> CheckTable:
    """Read the table in ``path``; ``expect_file`` names files of the table's own folder."""
    folder = path.resolve().parent
    return parse_table(_read_text(path, "the table"), source=str(path), run=run,
                       resolve=lambda name: _inside(folder, name))  # fmt: skip


def parse_table(
    text: str, *, source: str = "the table", run: str | None = None, resolve: Resolver
) -> CheckTable:
    """The table written in ``text`` (YAML); ``run`` overrides the table's own ``run``.

    ``resolve`` turns an ``expect_file`` into the local path to read, or raises (the local
    path rules of the front-end: :meth:`SandboxContext.local_path`).
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TABLE_BYTES:
        raise TableError(f"{source} is larger than {MAX_TABLE_BYTES // 1024**2} MiB")
    try:
        data = _load(text)
    except yaml.YAMLError as error:
        raise TableError(f"{source} is not valid YAML: {error}") from None
    except RecursionError:
        raise TableError(f"{source} is nested too deeply") from None
    if data is None:
        raise TableError(f"{source} is empty: write a list of cases (see %%sandbox_check?)")
    if isinstance(data, list):
        data = {"cases": data}
    if not isinstance(data, dict):
        raise TableError(
            f"{source} must be a list of cases, or a mapping with the keys "
            f"{', '.join(TABLE_KEYS)}; it is a {_kind(data)}"
        )
    return _table(data, source, run, resolve)


class _TableLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): a few hundred bytes of nested
    aliases expand to gigabytes (the "billion laughs"), and a table has ``defaults`` for
    what anchors would share."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a test table: use defaults:", mark
            )
        return super().compose_node(parent, index)


def _load(text: str) -> Any:
    """The table's data: JSON as JSON (what :meth:`CheckTable.inline` writes: YAML would read
    some of its characters differently, such as U+0085), anything else as YAML."""
    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError:
            pass  # YAML's flow style, like [{stdin: 1, expect: 2}]
    return yaml.load(text, Loader=_TableLoader)  # a SafeLoader


def _table(data: dict[Any, Any], source: str, run: str | None, resolve: Resolver) -> CheckTable:
    _no_unknown_keys(data, TABLE_KEYS, source)
    own_run = data.get("run")
    if own_run is not None and (not isinstance(own_run, str) or not own_run.strip()):
        raise TableError(f"{source}: run must be a command (a string), like ./sum")
    stop = data.get("stop_on_failure", False)
    if not isinstance(stop, bool):
        raise TableError(f"{source}: stop_on_failure must be true or false")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TableError(f"{source}: defaults must be a mapping of case keys")
    _no_unknown_keys(defaults, CASE_KEYS, f"{source}, defaults")
    if "name" in defaults:
        raise TableError(f"{source}: defaults cannot give a name (each case has its own)")
    cases = data.get("cases")
    if not isinstance(cases, list) or not cases:
        raise TableError(f"{source}: cases must be a non-empty list of cases")
    if len(cases) > MAX_CASES:
        raise TableError(f"{source} has {len(cases)} cases; at most {MAX_CASES} are allowed")
    read = [
        _case({**defaults, **_mapping(case, f"{source}, case {number}")}, number, source, resolve)
        for number, case in enumerate(cases, 1)
    ]
    _unique_names(read, source)
    return CheckTable(tuple(read), run=(run or own_run or None), stop_on_failure=stop)


def _mapping(case: object, where: str) -> dict[Any, Any]:
    if not isinstance(case, dict):
        raise TableError(f"{where} must be a mapping of keys (stdin:, expect:...), not a "
                         f"{_kind(case)}")  # fmt: skip
    _no_unknown_keys(case, CASE_KEYS, where)
    return case


def _case(data: dict[Any, Any], number: int, source: str, resolve: Resolver) -> Case:
    name = data.get("name", f"case {number}")
    where = f"{source}, case {number}"
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip():
        raise TableError(f"{where}: name must be a non-empty string")
    where = f"{source}, case {name!s}" if "name" in data else where
    read = _Reader(data, where)
    expectations = [key for key in ("expect", "expect_file", "expect_regex") if key in data]
    if len(expectations) > 1:
        raise TableError(f"{where}: give one of expect, expect_file and expect_regex, not "
                         f"{' and '.join(expectations)}")  # fmt: skip
    expect, expect_file = read.text("expect"), read.text("expect_file")
    if expect_file is not None:
        expect = _read_expected(expect_file, resolve, where)
    regex = read.text("expect_regex")
    if regex is not None:
        try:
            patterns.compile(regex)
        except patterns.error as error:
            raise TableError(f"{where}: expect_regex is not a valid regular expression: "
                             f"{error}") from None  # fmt: skip
    compare = data.get("compare", "trailing")
    if compare not in COMPARISONS:
        raise TableError(f"{where}: compare must be one of {', '.join(COMPARISONS)}, "
                         f"not {compare!r}")  # fmt: skip
    memory = read.number("memory", minimum=1)
    return Case(
        name=str(name).strip(),
        stdin=read.text("stdin"),
        args=read.words("args"),
        env=read.pairs("env", names=True),
        files=read.pairs("files", names=False),
        expect=expect,
        expect_regex=regex,
        expect_file=expect_file,
        compare=compare,
        tolerance=_or(read.number("tolerance", minimum=0), DEFAULT_TOLERANCE),
        points=_or(read.number("points", minimum=0), 1.0),
        hidden=read.flag("hidden"),
        timeout=_or(read.number("timeout", minimum=0.01), DEFAULT_TIMEOUT),
        memory=None if memory is None else math.ceil(memory),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class _Reader:
    """Typed reads of a case's keys, each error naming the case and the key."""

    def __init__(self, data: Mapping[Any, Any], where: str) -> None:
        self.data, self.where = data, where

    def fail(self, key: str, wanted: str) -> TableError:
        return TableError(f"{self.where}: {key} must be {wanted}, not {_shown(self.data[key])}")

    def text(self, key: str) -> str | None:
        """A string; numbers are taken as written (``expect: 5``)."""
        value = self.data.get(key)
        if value is None:
            return None
        text = _scalar_text(value)
        if text is None:
            raise self.fail(key, "a string")
        return text

    def words(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            raise self.fail(key, 'a list of arguments, like ["--big", "3"]')
        if not isinstance(value, list):
            raise self.fail(key, "a list of arguments")
        texts = [_scalar_text(item) for item in value]
        words = [text for text in texts if text is not None]
        if len(words) != len(texts):
            raise self.fail(key, "a list of strings")
        if any("\0" in word for word in words):
            raise self.fail(key, "free of NUL characters")
        return tuple(words)

    def pairs(self, key: str, *, names: bool) -> tuple[tuple[str, str], ...]:
        """A mapping of strings: variable names (``env``) or relative paths (``files``)."""
        value = self.data.get(key)
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping")
        pairs = []
        for name, content in value.items():
            text = _scalar_text(content)
            if text is None:
                raise self.fail(key, "a mapping of strings")
            name = str(name)
            if names and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise TableError(f"{self.where}: env: {name!r} is not a variable name")
            if not names:
                _check_relative(name, f"{self.where}: files")
            pairs.append((name, text))
        return tuple(pairs)

    def number(self, key: str, *, minimum: float) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-9 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "a number")
        if not math.isfinite(value) or value < minimum:
            raise self.fail(key, f"a number of at least {minimum:g}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value


def _shown(value: object) -> str:
    """A value of the table in an error, short whatever its size or depth."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 2, 60, 60


def _scalar_text(value: object) -> str | None:
    """A string as it is, a number as written (``expect: 5``); None for anything else (a
    boolean, a list, a mapping)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _check_relative(name: str, where: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "\0" in name or name.endswith("/"):
        raise TableError(f"{where}: {name!r} must be a relative file name inside the "
                         "working directory")  # fmt: skip


def _read_expected(name: str, resolve: Resolver, where: str) -> str:
    try:
        path = resolve(name)
    except (OSError, ValueError) as error:  # HostPathRefused is an OSError
        raise TableError(f"{where}: expect_file: {error}") from None
    return _read_text(path, f"{where}: expect_file {name}", MAX_EXPECTED_BYTES)


def _read_text(path: Path, what: str, limit: int = MAX_TABLE_BYTES) -> str:
    if path.exists() and not path.is_file():  # a FIFO would block the kernel for good
        raise TableError(f"{what} is not a regular file ({path})")
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as error:
        raise TableError(f"{what} cannot be read: {error.strerror or error} ({path})") from None
    if len(data) > limit:
        raise TableError(f"{what} is larger than {limit // 1024**2} MiB ({path})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TableError(f"{what} is not UTF-8 text ({path})") from None


def _inside(folder: Path, name: str) -> Path:
    """``name`` resolved in ``folder``, refused if it leads outside (the table's folder is
    all a table may name: a shared table cannot read the grader's other files)."""
    resolved = (folder / name).resolve()
    if not resolved.is_relative_to(folder):
        raise ValueError(f"{name!r} is outside the table's folder {folder}: name a file there")
    return resolved


def _no_unknown_keys(data: Mapping[Any, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [str(key) for key in data if key not in known]
    if unknown:
        raise TableError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(known)}")


def _unique_names(cases: list[Case], source: str) -> None:
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise TableError(f"{source}: two cases are named {case.name!r}; names must differ")
        seen.add(case.name)


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "mapping", list: "list", str: "string"}
    return names.get(type(value), type(value).__name__)

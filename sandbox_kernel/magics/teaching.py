"""Teaching cells: a cell in one of the sandbox's languages is written to a file in the
environment, compiled when the language needs it, and run; the file stays for later cells.

The file gets one blank first line, so that a compiler's line numbers are the cell's own (the
cell's first line is the ``%%c`` line). A failed compilation does not run anything. The JVM is
given a heap that fits the sandbox's memory limit, or it would not start.
"""

from __future__ import annotations

import argparse
import dataclasses
import posixpath
import secrets
import shlex

from .._errors import SandboxError
from ..checking import CheckTable, compilation_failed
from ..session import CellOutcome
from ..session.context import SandboxContext
from . import checking
from .core import MagicFailed, MagicResult, MagicUsageError, _Parser, magic

_DEFAULT_HEAP_MB = 256


@dataclasses.dataclass(frozen=True)
class Language:
    name: str
    file: str
    needs: tuple[str, ...]
    run: str  # {file} {stem} {args} {heap}
    compile: str | None = None  # {file} {stem} {flags} {heap}
    flags: str = ""
    title: str = ""


LANGUAGES = [
    Language("python3", "main.py", ("python3",), "python3 {file} {args}", title="Python 3"),
    Language(
        "c", "main.c", ("gcc",), "./{stem} {args}", "gcc {flags} -o {stem} {file} -lm", "-Wall", "C"
    ),
    Language(
        "cpp",
        "main.cpp",
        ("g++",),
        "./{stem} {args}",
        "g++ {flags} -o {stem} {file}",
        "-Wall",
        "C++",
    ),
    Language(
        "java",
        "Main.java",
        ("javac", "java"),
        "java -Xmx{heap}m -Xss1m -XX:+UseSerialGC -cp . {stem} {args}",
        "javac -J-Xmx{heap}m {flags} {file}",
        "",
        "Java",
    ),
    Language("perl", "main.pl", ("perl",), "perl {file} {args}", title="Perl"),
    Language("ruby", "main.rb", ("ruby",), "ruby {file} {args}", title="Ruby"),
    Language("node", "main.js", ("node",), "node {file} {args}", title="JavaScript (Node.js)"),
    Language("php", "main.php", ("php",), "php {file} {args}", title="PHP"),
    Language("lua", "main.lua", ("lua",), "lua {file} {args}", title="Lua"),
    Language("R", "main.R", ("Rscript",), "Rscript {file} {args}", title="R"),
    Language("python2", "main.py", ("python2",), "python2 {file} {args}", title="Python 2"),
]


def _arguments(language: Language) -> object:
    def add(parser: _Parser) -> None:
        parser.add_argument(
            "--file",
            default=language.file,
            help=f"file to write in the environment (default {language.file})",
        )
        parser.add_argument("--args", default="", help="command-line arguments, as one string")
        parser.add_argument("--stdin", help="text given on standard input (\\n for new lines)")
        parser.add_argument(
            "--check",
            metavar="TABLE_FILE",
            help="instead of running the program once, run a table of cases against it "
            "(a local YAML file, as %%%%sandbox_check --tests reads) and show the verdicts",
        )
        if language.compile:
            parser.add_argument(
                "--flags",
                default=language.flags,
                help=f"compiler flags (default: {language.flags or 'none'})",
            )

    return add


def _register(language: Language) -> None:
    summary = f"{language.title}: write the cell to {language.file}, "
    summary += "compile it and run it" if language.compile else "and run it"

    @magic(language.name, summary, kind="cell", arguments=_arguments(language))  # type: ignore[arg-type]
    def teaching_cell(
        context: SandboxContext, args: argparse.Namespace, cell: str | None
    ) -> MagicResult:
        return run_teaching_cell(context, language, args, cell or "")


for _language in LANGUAGES:
    _register(_language)


def run_teaching_cell(
    context: SandboxContext, language: Language, args: argparse.Namespace, source: str
) -> MagicResult:
    _check_file_name(args.file)
    table = _check_table(context, language, args)
    _check_available(context, language)
    heap = _heap_mb(context)
    try:
        script = build(language, args, source, heap, run_it=table is None)
    except ValueError as error:  # unbalanced quotes in --args or --flags
        raise MagicUsageError(f"%%{language.name}: --args/--flags: {error}") from None
    if table is None:
        return MagicResult(script=script)
    table = table.with_run(_program(language, args, heap))

    def check(compiled: CellOutcome) -> MagicResult:
        if not compiled.ok:
            return checking.shown(compilation_failed(table))
        return checking.check_result(context, table)

    return MagicResult(script=script, then=check)


def _check_table(
    context: SandboxContext, language: Language, args: argparse.Namespace
) -> CheckTable | None:
    """The table of ``--check`` (read before anything runs: a bad table runs nothing)."""
    if args.check is None:
        return None
    name = f"%%{context.teaching_prefix}{language.name} --check"
    for option in ("stdin", "args"):
        if getattr(args, option):
            raise MagicUsageError(f"{name}: the cases give their own {option}; drop --{option}")
    context.refuse_while_grading(name)
    return checking.read_table(context, "", args.check, None, name)


def _program(language: Language, args: argparse.Namespace, heap: int) -> str:
    """The command that runs the cell's program, from the working directory."""
    folder, name = posixpath.split(args.file)
    stem = posixpath.splitext(name)[0]

    def run(file: str) -> str:
        return language.run.format(file=shlex.quote(file), stem=shlex.quote(stem), heap=heap,
                                   args="").strip()  # fmt: skip

    if not folder:
        return run(name)
    if language.name == "java":  # no shell: the check sets the JVM's -Xmx for memory:
        return run(name).replace("-cp .", f"-cp {shlex.quote(folder)}")
    if language.compile:  # compiled where the source is: run from there
        return f"cd {shlex.quote(folder)} && {run(name)}"
    return run(args.file)


def build(
    language: Language, args: argparse.Namespace, source: str, heap: int, *, run_it: bool = True
) -> str:
    """The bash script of a teaching cell (``run_it`` false: write and compile only)."""
    stem = posixpath.splitext(posixpath.basename(args.file))[0]
    values = {
        "file": shlex.quote(args.file),
        "stem": shlex.quote(stem),
        "args": " ".join(shlex.quote(a) for a in shlex.split(args.args)),
        "heap": str(heap),
        "flags": " ".join(shlex.quote(f) for f in shlex.split(getattr(args, "flags", "") or "")),
    }
    delimiter = f"SANDBOX_SOURCE_{secrets.token_hex(6)}"
    folder = posixpath.dirname(args.file)
    lines = [f"mkdir -p {shlex.quote(folder)}"] if folder else []
    lines.append(f"cat > {values['file']} <<'{delimiter}'\n\n{source.rstrip(chr(10))}\n{delimiter}")
    run = language.run.format(**values).strip() if run_it else ""
    if args.stdin is not None and run:
        run = f"printf '%s\\n' {shlex.quote(args.stdin.replace(chr(92) + 'n', chr(10)))} | {run}"
    if language.compile:
        if folder:
            lines.append(f"cd {shlex.quote(folder)}")
            values["file"] = shlex.quote(posixpath.basename(args.file))
        compile_line = language.compile.format(**values).strip()
        lines.append(f"{compile_line} && {run}" if run else compile_line)
        if folder:
            lines.append("__sk_status=$?; cd - >/dev/null; (exit $__sk_status)")
    elif run:
        lines.append(run)
    return "\n".join(lines) + "\n"


def _check_file_name(name: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "\0" in name:
        raise MagicUsageError(f"--file {name!r}: give a relative path inside the environment")


def _check_available(context: SandboxContext, language: Language) -> None:
    try:
        executables = set(context.inventory().executables)
    except SandboxError as error:
        raise MagicFailed(f"Could not list the sandbox's executables: {error}") from None
    missing = [program for program in language.needs if program not in executables]
    if missing:
        raise MagicFailed(
            f"This sandbox cannot run {language.title} cells: it has no "
            f"{' and no '.join(missing)} on its PATH (%sandbox_libraries {missing[0]} searches "
            "what it has)."
        )


def _heap_mb(context: SandboxContext) -> int:
    """Half the sandbox's memory limit for the JVM heap (the rest: metaspace, threads)."""
    try:
        ram = context.specs().limits.ram
    except SandboxError:
        return _DEFAULT_HEAP_MB
    if ram is not None and ram > 0:
        return max(32, ram // 2 // 1024**2)
    return _DEFAULT_HEAP_MB

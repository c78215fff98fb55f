"""Editor support for bash cells: completion, inspection, is-complete. Pure functions over the
text of a cell and what the kernel knows of the sandbox (no request of their own), plus
:class:`EnvironmentFiles`, which lists an environment's folders for path completion.

Paths complete as in bash, from the shell's carried directory: ``cat ../f``, ``ls sub/di``,
``~/`` (``/home/student``). The kernel knows the files of the current directory from each
cell's bookkeeping; other folders under ``/home/student`` come from the environment's archive
(``environments/UUID``), whose member names :class:`EnvironmentFiles` reads in the background,
once per environment. Outside ``/home/student`` (``/usr/``), or before the archive came,
nothing is offered rather than a guess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gzip
import io
import posixpath
import re
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._generations import CATEGORY_NAMES, Inventory
from ..protocol import LIBRARY_CATEGORIES, WORKING_DIR
from ..session import ShellState
from ..session.cellscript import STATE_DIR

if TYPE_CHECKING:
    from ..session.context import SandboxContext

KEYWORDS = [
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "case",
    "esac",
    "for",
    "select",
    "while",
    "until",
    "do",
    "done",
    "in",
    "function",
    "time",
    "coproc",
    "{",
    "}",
    "!",
    "[[",
    "]]",
]
BUILTINS = [
    "alias",
    "bg",
    "bind",
    "break",
    "builtin",
    "caller",
    "cd",
    "command",
    "compgen",
    "complete",
    "continue",
    "declare",
    "dirs",
    "disown",
    "echo",
    "enable",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fc",
    "fg",
    "getopts",
    "hash",
    "help",
    "history",
    "jobs",
    "kill",
    "let",
    "local",
    "logout",
    "mapfile",
    "popd",
    "printf",
    "pushd",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "set",
    "shift",
    "shopt",
    "source",
    "suspend",
    "test",
    "times",
    "trap",
    "true",
    "type",
    "typeset",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "wait",
]
#: After these, the next word is a command name.
_COMMAND_POSITION = re.compile(r"(^|[;&|(`!]|\$\(|\b(?:then|do|else|elif|if|while|until|time))\s*$")
_WORD = re.compile(r"[^\s;&|()<>`'\"]*$")
_OPENS_BLOCK = re.compile(r"(\b(then|do|else|in)|[{(]|\|\||&&|\|)\s*$")


#: Folders, as absolute paths under ``/home/student``, with their entries (``name``, or
#: ``name/`` for a folder).
Tree = Mapping[str, Sequence[str]]


@dataclasses.dataclass
class Knowledge:
    """What completion and inspection may draw on, all cached by the kernel."""

    state: ShellState
    environ: Mapping[str, str]
    #: What the sandbox has installed; None until the kernel has fetched it.
    inventory: Inventory | None = None
    #: Every folder of the current environment (:class:`EnvironmentFiles`); None until known.
    tree: Tree | None = None

    @property
    def executables(self) -> tuple[str, ...]:
        return self.inventory.executables if self.inventory is not None else ()

    @property
    def cwd(self) -> str:
        return posixpath.normpath(self.state.cwd or WORKING_DIR)

    def entries(self, folder: str) -> Sequence[str] | None:
        """The entries of the absolute folder ``folder``, or None when not known. Under
        ``/home/student`` they come from the tree when it is known (it is the current
        environment's: as new as the last cell's listing, or newer after an upload), where a
        folder that is not there does not exist; else the current directory's come from the
        last cell's listing."""
        if self.tree is not None and _under_home(folder):
            return self.tree.get(folder, ())
        if folder == self.cwd:
            return self.state.files
        return None


def complete(code: str, cursor: int, known: Knowledge) -> dict[str, Any]:
    """A ``complete_reply`` content: commands in command position, variables after ``$``,
    and paths everywhere else (files only: ``cat gra`` never offers the command ``cat``)."""
    before = code[:cursor]
    word = _WORD.search(before)
    token = word.group(0) if word else ""
    start = cursor - len(token)
    if token.startswith("${"):
        names = [*known.state.variables, *known.environ]
        matches = [f"${{{name}}}" for name in names if name.startswith(token[2:])]
    elif token.startswith("$"):
        names = [*known.state.variables, *known.environ]
        matches = [f"${name}" for name in names if name.startswith(token[1:])]
    elif _COMMAND_POSITION.search(before[:start]) and "/" not in token:
        candidates: Iterable[str] = (
            *known.state.functions,
            *known.state.aliases,
            *KEYWORDS,
            *BUILTINS,
            *known.executables,
        )
        matches = [name for name in candidates if name.startswith(token)]
    else:
        matches = _paths(token, known)
    return {
        "matches": sorted(set(matches), key=lambda m: (m.lower(), m)),
        "cursor_start": start,
        "cursor_end": cursor,
        "metadata": {},
        "status": "ok",
    }


def _paths(token: str, known: Knowledge) -> list[str]:
    """The paths that complete ``token``, written as the user started them."""
    if token == "~":
        return ["~/"]
    folder_text, slash, prefix = token.rpartition("/")
    folder_text += slash
    folder = _folder(folder_text, known.cwd)
    entries = known.entries(folder) if folder is not None else None
    return [folder_text + entry for entry in entries or () if entry.startswith(prefix)]


def _folder(written: str, cwd: str) -> str | None:
    """The absolute folder that ``written`` (``""``, ``../``, ``~/sub/``, ``/usr/``) names from
    ``cwd``; None for ``~user/``, whose home is not known."""
    if written.startswith("~"):
        user, _, rest = written[1:].partition("/")
        if user:
            return None
        written = f"{WORKING_DIR}/{rest}"
    return posixpath.normpath(posixpath.join(cwd, written))


def _under_home(folder: str) -> bool:
    return folder == WORKING_DIR or folder.startswith(WORKING_DIR + "/")


def _completes_a_path(code: str, cursor: int) -> bool:
    """Whether :func:`complete` offers paths at ``cursor`` (not a command, nor a variable)."""
    before = code[:cursor]
    word = _WORD.search(before)
    token = word.group(0) if word else ""
    start = cursor - len(token)
    if token.startswith("$") or token == "~":
        return False
    return "/" in token or not _COMMAND_POSITION.search(before[:start])


def wanted_folder(code: str, cursor: int, known: Knowledge) -> str | None:
    """The folder under ``/home/student`` whose entries completing at ``cursor`` needs and
    ``known`` lacks (the kernel then waits a little for :class:`EnvironmentFiles`), or None."""
    if not _completes_a_path(code, cursor):
        return None
    word = _WORD.search(code[:cursor])
    token = word.group(0) if word else ""
    folder = _folder(token.rpartition("/")[0] + "/" if "/" in token else "", known.cwd)
    if folder is None or not _under_home(folder) or known.entries(folder) is not None:
        return None
    return folder


def archive_tree(data: bytes, *, max_members: int = 50_000, max_bytes: int = 256 << 20) -> Tree:
    """Every folder under ``/home/student`` of an environment archive (a ``.tgz``) with its
    entries, from its member names. A damaged or endless archive gives what was read before
    the damage, or before ``max_members`` members or ``max_bytes`` decompressed."""
    tree: dict[str, set[str]] = {WORKING_DIR: set()}
    with contextlib.suppress(tarfile.TarError, OSError, EOFError, _TooLarge):
        stream = _Limited(gzip.GzipFile(fileobj=io.BytesIO(data)), max_bytes)
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for count, member in enumerate(archive):
                if count >= max_members:
                    break
                _add_member(tree, member.name, member.isdir())
    return {folder: tuple(sorted(entries)) for folder, entries in tree.items()}


def _add_member(tree: dict[str, set[str]], name: str, is_folder: bool) -> None:
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts or parts[0] == STATE_DIR:
        return
    folder = WORKING_DIR
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        tree.setdefault(folder, set()).add(part if last and not is_folder else part + "/")
        folder = f"{folder}/{part}"
        if not last or is_folder:
            tree.setdefault(folder, set())


class _TooLarge(Exception):
    pass


class _Limited(io.RawIOBase):
    """A reader that stops (with :class:`_TooLarge`) after ``limit`` bytes: a small archive
    that decompresses into gigabytes of headers is not read to its end."""

    def __init__(self, source: gzip.GzipFile, limit: int) -> None:
        self.source, self.left = source, limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size >= 0 else 1 << 20)
        self.left -= len(data)
        if self.left < 0:
            raise _TooLarge
        return data


class EnvironmentFiles:
    """The folders of environments, for path completion outside the current directory.

    The first completion that needs a folder starts fetching the environment's archive in the
    context's worker thread (as the inventory is), once per environment uuid; an archive
    larger than :attr:`limit` is not fetched, and completion then knows only the current
    directory. Each cell makes a new environment, so the tree is fetched again only when a
    completion after that cell needs it.
    """

    #: The largest archive fetched to list folders (the environment's size is asked first).
    limit = 4 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._environment: str | None = None
        self._tree: concurrent.futures.Future[Tree] | None = None

    def known(self, environment: str | None) -> Tree | None:
        """The environment's tree if it has been read already (no request, no wait)."""
        with self._lock:
            future = self._tree if environment == self._environment else None
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def fetch(self, context: SandboxContext, environment: str) -> concurrent.futures.Future[Tree]:
        """Start reading the environment's tree, unless it is read or coming (a failure is
        kept: a completion does not ask again for the same environment)."""
        with self._lock:
            if environment != self._environment or self._tree is None:
                self._environment = environment
                self._tree = context.submit(
                    lambda: archive_tree(context.fetch(None, environment, self.limit))
                )
            return self._tree

    async def complete(
        self,
        context: SandboxContext | None,
        code: str,
        cursor: int,
        known: Knowledge,
        wait: float = 2.0,
    ) -> dict[str, Any]:
        """:func:`complete` with the environment's tree: the one known, or, when completing
        needs a folder not known yet, the one read within ``wait`` seconds (without it, what
        is known; the next Tab has it). Completing a path in the current directory answers
        at once from the last cell's listing and reads the tree meanwhile (an upload since
        that cell is then listed by the next Tab)."""
        environment = context.session.environment if context is not None else None
        known = dataclasses.replace(known, tree=self.known(environment))
        if context is None or environment is None or known.tree is not None:
            return complete(code, cursor, known)
        if not _completes_a_path(code, cursor):
            return complete(code, cursor, known)
        future = self.fetch(context, environment)
        if wanted_folder(code, cursor, known) is None:
            return complete(code, cursor, known)
        coming = asyncio.wrap_future(future)
        with contextlib.suppress(Exception):  # completion works without it
            await asyncio.wait_for(asyncio.shield(coming), wait)
        return complete(code, cursor, dataclasses.replace(known, tree=self.known(environment)))


def word_at(code: str, cursor: int) -> str:
    """The shell word around ``cursor`` (for Shift-Tab)."""
    left = re.search(r"[\w.+-]*$", code[:cursor])
    right = re.match(r"[\w.+-]*", code[cursor:])
    return (left.group(0) if left else "") + (right.group(0) if right else "")


def inspect(code: str, cursor: int, known: Knowledge) -> dict[str, Any]:
    """An ``inspect_reply`` content: whether the sandbox has the word under the cursor."""
    name = word_at(code, cursor).lstrip("$")
    lines = _describe(name, known) if name else []
    if not lines:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    return {"status": "ok", "found": True, "data": {"text/plain": "\n".join(lines)}, "metadata": {}}


def _describe(name: str, known: Knowledge) -> list[str]:
    lines = []
    if name in known.state.functions:
        lines.append(f"{name}: a shell function defined in this notebook")
    if name in known.state.aliases:
        lines.append(f"{name}: an alias defined in this notebook")
    if name in known.state.variables or name in known.environ:
        origin = "sent with every cell (%sandbox_env)" if name in known.environ else "carried"
        lines.append(f"{name}: a shell variable ({origin})")
    if name in KEYWORDS:
        lines.append(f"{name}: a bash keyword")
    elif name in BUILTINS:
        lines.append(f"{name}: a bash builtin")
    if name in known.executables:
        lines.append(f"{name}: an executable on the sandbox's PATH")
    libraries = known.inventory.libraries if known.inventory is not None else {}
    for category in LIBRARY_CATEGORIES:
        entries = libraries.get(category, {})
        if name in entries:
            version = entries[name]
            told = f", version {version}" if version else ""
            lines.append(f"{name}: {CATEGORY_NAMES[category].one}{told}")
    if not lines and known.executables:
        lines.append(f"{name}: not found in the sandbox (no such command or library)")
    return lines


def is_complete(code: str) -> dict[str, Any]:
    """``complete``, ``incomplete`` (with an indent hint) or ``invalid``, the way bash sees it.

    Uses ``bash -n`` (parse only) when bash is installed here; open quotes, here-documents,
    a trailing backslash and unclosed ``if/for/while/case/{`` are incomplete.
    """
    stripped = code.rstrip("\n")
    if stripped.endswith("\\") and not stripped.endswith("\\\\"):
        return _incomplete(code)
    verdict = _bash_parse(code)
    if verdict == "incomplete":
        return _incomplete(code)
    return {"status": verdict}


def _bash_parse(code: str) -> str:
    bash = shutil.which("bash")
    if bash is None:
        return "unknown"
    try:
        done = subprocess.run(
            [bash, "-n"], input=code + "\n", capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    errors = done.stderr
    if "here-document" in errors and "delimited by end-of-file" in errors:
        return "incomplete"
    if done.returncode == 0:
        return "complete"
    if "unexpected end of file" in errors or "unexpected EOF" in errors:
        return "incomplete"
    return "invalid"


def _incomplete(code: str) -> dict[str, Any]:
    last = code.rstrip("\n").splitlines()[-1] if code.strip() else ""
    indent = last[: len(last) - len(last.lstrip())]
    if _OPENS_BLOCK.search(last):
        indent += "    "
    return {"status": "incomplete", "indent": indent}

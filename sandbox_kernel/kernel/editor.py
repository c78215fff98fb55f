"""Editor support for bash cells: completion, inspection, is-complete. Pure functions over the
text of a cell and what the kernel knows of the sandbox (no request of their own)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

from .._generations import CATEGORY_NAMES, Inventory
from ..protocol import LIBRARY_CATEGORIES
from ..session import ShellState

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


@dataclasses.dataclass
class Knowledge:
    """What completion and inspection may draw on, all cached by the kernel."""

    state: ShellState
    environ: Mapping[str, str]
    #: What the sandbox has installed; None until the kernel has fetched it.
    inventory: Inventory | None = None

    @property
    def executables(self) -> tuple[str, ...]:
        return self.inventory.executables if self.inventory is not None else ()


def complete(code: str, cursor: int, known: Knowledge) -> dict[str, Any]:
    """A ``complete_reply`` content: commands, files, variables and keywords."""
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
        matches = [name for name in known.state.files if name.startswith(token)]
    return {
        "matches": sorted(set(matches), key=lambda m: (m.lower(), m)),
        "cursor_start": start,
        "cursor_end": cursor,
        "metadata": {},
        "status": "ok",
    }


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

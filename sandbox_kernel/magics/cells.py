"""Where magics sit in a kernel cell: only in its leading lines.

A first line ``%%name args`` makes the whole cell a cell magic; otherwise each leading line
``%name args`` is a line magic, run before the rest of the cell (bash). A ``%`` further down (a
heredoc, a yacc file, ``printf '%s'``, a job spec such as ``%1``) is left alone, except a line
that starts with the name of a known magic: bash would run it as a job spec and answer
``fg: no job control``, so the cell is refused with :class:`MagicUsageError` saying where
magic lines go. Lines inside a here-document or a multi-line quote are text, never refused.
"""

from __future__ import annotations

import dataclasses
import re

from .core import REGISTRY, MagicUsageError

#: ``<<WORD``, ``<<-WORD``, ``<< 'WORD'``, ``<<"WORD"`` (not ``<<<``, a here-string).
_HEREDOC = re.compile(r"""<<(-?)[ \t]*(?:'([^'\n]*)'|"([^"\n]*)"|\\?([^\s;&|<>()'"]+))""")


@dataclasses.dataclass
class SplitCell:
    line_magics: list[tuple[str, str]]
    cell_magic: tuple[str, str, str] | None  # name, arguments, body
    #: The bash part; magic lines become blank lines so that bash's line numbers stay the
    #: cell's own.
    code: str


def split_cell(code: str) -> SplitCell:
    """The cell's leading magics and its bash; :class:`MagicUsageError` for a known magic's
    line after the first bash line (nothing of the cell runs then)."""
    lines = code.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None and lines[first].lstrip().startswith("%%"):
        name, _, arguments = lines[first].lstrip()[2:].partition(" ")
        body = "\n".join(lines[first + 1 :])
        return SplitCell([], (name.strip(), arguments.strip(), body), "")
    magics: list[tuple[str, str]] = []
    index = 0
    while index < len(lines) and (
        not lines[index].strip() or lines[index].lstrip().startswith("%")
    ):
        line = lines[index].strip()
        if line:
            name, _, arguments = line[1:].partition(" ")
            magics.append((name.strip(), arguments.strip()))
        index += 1
    _refuse_late_magics(lines, index)
    rest = "\n" * index + "\n".join(lines[index:]) if magics else code
    return SplitCell(magics, None, rest)


def _refuse_late_magics(lines: list[str], start: int) -> None:
    """Raise for the first line from ``start`` on that bash would see as a command starting
    with a known magic (``%sandbox_env X=1``, ``%%c``)."""
    reader = _BashLines()
    for number, line in enumerate(lines[start:], start=start + 1):
        if reader.at_command_start:
            name = _magic_name(line)
            if name is not None:
                raise MagicUsageError(_late_magic_message(number, name))
        reader.feed(line)


def _magic_name(line: str) -> str | None:
    """``%name`` or ``%%name`` when the line starts with a known magic, else None."""
    stripped = line.lstrip()
    percents = len(stripped) - len(stripped.lstrip("%"))
    if percents not in (1, 2):
        return None
    name = stripped[percents:].split(None, 1)[0] if stripped[percents:].strip() else ""
    return "%" * percents + name if name in REGISTRY else None


def _late_magic_message(number: int, written: str) -> str:
    """What happened and what to do, in two lines."""
    name = written.lstrip("%")
    if REGISTRY[name].kind == "cell":
        where = f"{written} must be the first line of its cell: move it and its code to a new cell."
    else:
        where = f"Put {written} before the bash lines of the cell, or in a cell of its own."
    return f"Line {number}: {written} comes after bash code, where bash cannot run it.\n{where}"


class _BashLines:
    """Just enough of bash's reading to tell whether a line starts a new command: not inside a
    here-document, an open quote or a line continued by a backslash."""

    def __init__(self) -> None:
        self.heredocs: list[tuple[str, bool]] = []  # delimiter, tabs stripped (<<-)
        self.quote: str | None = None
        self.continued = False

    @property
    def at_command_start(self) -> bool:
        return not self.heredocs and self.quote is None and not self.continued

    def feed(self, line: str) -> None:
        if self.heredocs:
            delimiter, strip_tabs = self.heredocs[0]
            if (line.lstrip("\t") if strip_tabs else line) == delimiter:
                self.heredocs.pop(0)
            return
        self.continued = False
        for position in self._redirections(line):
            match = _HEREDOC.match(line, position)
            if match is not None:
                word = next(group for group in match.groups()[1:] if group is not None)
                self.heredocs.append((word, match.group(1) == "-"))

    def _redirections(self, line: str) -> list[int]:
        """Follow quotes and escapes through ``line``; returns where ``<<`` (not ``<<<``)
        stands unquoted and uncommented, the here-documents it opens."""
        found: list[int] = []
        index = 0
        while index < len(line):
            char = line[index]
            if self.quote == "'":
                if char == "'":
                    self.quote = None
            elif self.quote == '"':
                if char == "\\":
                    index += 1
                elif char == '"':
                    self.quote = None
            elif char == "\\":
                if index == len(line) - 1:
                    self.continued = True
                index += 1
            elif char in "'\"":
                self.quote = char
            elif char == "#" and (index == 0 or line[index - 1] in " \t;&|()"):
                break
            elif line.startswith("<<", index):
                arithmetic = line.count("((", 0, index) > line.count("))", 0, index)
                if not line.startswith("<<<", index) and not arithmetic:  # not 1<<2
                    found.append(index)
                index = len(line) - len(line[index:].lstrip("<")) - 1
            index += 1
        return found

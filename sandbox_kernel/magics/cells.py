"""Where magics sit in a kernel cell: only in its leading lines.

A first line ``%%name args`` makes the whole cell a cell magic; otherwise each leading line
``%name args`` is a line magic, run before the rest of the cell (bash). A ``%`` further down (a
heredoc, a yacc file, ``printf '%s'``) is left alone.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SplitCell:
    line_magics: list[tuple[str, str]]
    cell_magic: tuple[str, str, str] | None  # name, arguments, body
    #: The bash part; magic lines become blank lines so that bash's line numbers stay the
    #: cell's own.
    code: str


def split_cell(code: str) -> SplitCell:
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
    rest = "\n" * index + "\n".join(lines[index:]) if magics else code
    return SplitCell(magics, None, rest)

"""Reading a submission: its code cells in order, and which questions each one answers.

A submission is untrusted input: its size is capped before it is read, it must be valid JSON
and valid nbformat 4, and only its code cells' sources and tags are kept. Its outputs and
metadata (the kernel it names among them) are never used.
"""

# nbformat is not typed: calls into it cannot be checked.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .._units import format_size

#: A notebook larger than this is refused unread (a class's notebooks are kilobytes).
MAX_NOTEBOOK_BYTES = 32 * 1024**2
#: The tag prefix of a cell whose question is checked right after it.
CHECK_TAG = "check:"


class InvalidNotebook(ValueError):
    """The file cannot be graded as a notebook; the message says why, briefly."""


@dataclasses.dataclass(frozen=True)
class CodeCell:
    """A code cell to run: its 1-based position among all cells, its source, and the
    questions checked after it (from its ``check:NAME`` tags, in tag order)."""

    position: int
    source: str
    checks: tuple[str, ...] = ()


def check_names(tags: object) -> tuple[str, ...]:
    """The NAMEs of the ``check:NAME`` tags in ``tags`` (a cell's ``metadata.tags``); other
    tags, and anything that is not a list of strings, are ignored."""
    if not isinstance(tags, list):
        return ()
    names = []
    for tag in tags:
        if isinstance(tag, str) and tag.strip().startswith(CHECK_TAG):
            name = tag.strip()[len(CHECK_TAG) :].strip()
            if name:
                names.append(name)
    return tuple(names)


def read_submission(path: Path) -> list[CodeCell]:
    """The code cells of the notebook at ``path``; :class:`InvalidNotebook` when it is not
    one (unreadable, too large, not JSON, not nbformat 4)."""
    text = _read_capped(path)
    try:
        data = json.loads(text)
    except ValueError as error:
        raise InvalidNotebook(f"not JSON ({error})") from None
    if not isinstance(data, dict):
        raise InvalidNotebook("not a notebook (the JSON is not an object)")
    return _code_cells(_validated(data))


def _read_capped(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_NOTEBOOK_BYTES + 1)
    except OSError as error:
        raise InvalidNotebook(f"cannot read it ({error.strerror})") from None
    if len(raw) > MAX_NOTEBOOK_BYTES:
        raise InvalidNotebook(f"larger than {format_size(MAX_NOTEBOOK_BYTES)}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidNotebook(f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def _validated(data: dict[str, Any]) -> Any:
    """The notebook as nbformat 4, validated against its schema."""
    import nbformat
    from nbformat.validator import ValidationError

    major = data.get("nbformat")
    if not isinstance(major, int) or isinstance(major, bool) or major < 4:
        raise InvalidNotebook(
            f"not an nbformat 4 notebook (nbformat: {major!r}); save it with Jupyter 4 or later"
        )
    try:
        notebook = nbformat.from_dict(data)
        nbformat.validate(notebook)
    except ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        message = _brief(str(error.message))
        raise InvalidNotebook(f"not valid nbformat at {where or 'top level'}: {message}") from None
    except Exception as error:  # nbformat raises various errors on odd input
        raise InvalidNotebook(
            f"not valid nbformat ({_brief(f'{type(error).__name__}: {error}')})"
        ) from None
    return notebook


def _brief(text: str, limit: int = 200) -> str:
    """A validator's message, whose quoted value may be a whole cell, cut short."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _code_cells(notebook: Any) -> list[CodeCell]:
    cells = []
    for position, cell in enumerate(notebook.cells, start=1):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        tags = cell.get("metadata", {}).get("tags")
        cells.append(CodeCell(position, str(source), check_names(tags)))
    return cells

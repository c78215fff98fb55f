"""The magics, written once: a registry of operations that both front-ends adapt.

A magic is a name, a one-line summary, an ``argparse`` parser (its usage text is the help a
user gets on bad use) and an operation ``(context, args, cell) -> MagicResult``. The kernel
calls them from a cell's leading ``%`` lines, the IPython extension registers them with
IPython's ``Magics`` machinery; neither knows what a magic does.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Callable
from typing import Any, NoReturn

from ..session import CellOutcome
from ..session.context import OperationFailed, SandboxContext
from ..views.render import Bundle


class MagicUsageError(Exception):
    """Bad use of a magic: the message is what went wrong, then the magic's usage. Nothing
    was sent to the sandbox."""


class MagicFailed(OperationFailed):
    """A magic was used right but could not do its job (a file exists, the sandbox said no);
    the message says what happened and what to do. Front-ends catch its base,
    :class:`OperationFailed`, which the façade's operations raise."""


@dataclasses.dataclass
class MagicResult:
    """What a magic gives back: a Python value (for ``x = %magic``), things to display, and
    possibly a script to run as a cell."""

    value: Any = None
    bundles: list[Bundle] = dataclasses.field(default_factory=list)
    #: A bash script the front-end runs as a cell (teaching cells), with interrupts and all.
    script: str | None = None
    #: A live view to display, then ``start()`` on the front-end's event loop (the panel).
    view: Any = None
    #: What to do once :attr:`script` has run (a teaching cell's ``--check``): called with
    #: the script's outcome in the front-end's worker thread, it gives what to show next.
    then: Callable[[CellOutcome], MagicResult] | None = None


Operation = Callable[[SandboxContext, argparse.Namespace, "str | None"], MagicResult]


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports bad use instead of exiting the process."""

    def error(self, message: str) -> NoReturn:
        raise MagicUsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # --help lands here: show the help as the "error" so nothing runs.
        raise MagicUsageError((message or "") + self.format_help())


@dataclasses.dataclass
class Magic:
    name: str
    summary: str
    kind: str  # "line", "cell" or "line_cell"
    parser: _Parser
    operation: Operation

    def run(self, context: SandboxContext, line: str, cell: str | None) -> MagicResult:
        try:
            words = shlex.split(line)
        except ValueError as error:
            raise MagicUsageError(
                f"%{self.name}: {error}\n{self.parser.format_usage().strip()}"
            ) from None
        args = self.parser.parse_args(words)
        args.line = line  # as written: a magic may need its shell syntax (%%sandbox_check)
        return self.operation(context, args, cell)

    @property
    def usage(self) -> str:
        return self.parser.format_usage().strip()


REGISTRY: dict[str, Magic] = {}


def magic(
    name: str, summary: str, kind: str = "line", arguments: Callable[[_Parser], None] | None = None
) -> Callable[[Operation], Operation]:
    """Register an operation as the magic ``name`` (``%name`` or ``%%name``)."""

    def register(operation: Operation) -> Operation:
        prefix = "%%" if kind == "cell" else "%"
        parser = _Parser(prog=f"{prefix}{name}", description=summary, add_help=True)
        if arguments is not None:
            arguments(parser)
        REGISTRY[name] = Magic(name, summary, kind, parser, operation)
        return operation

    return register


def find(name: str) -> Magic:
    """The magic called ``name``; an unknown name lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(
            f"%{m.name}" if m.kind != "cell" else f"%%{m.name}" for m in REGISTRY.values()
        )
        raise MagicUsageError(
            f"Unknown magic %{name}. Known magics: {known}. %sandbox_help describes them."
        ) from None

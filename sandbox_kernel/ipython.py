"""The IPython front-end: ``%load_ext sandbox_kernel`` in an ordinary Python notebook.

Registers every sandbox magic with IPython (the same operations as in the Sandbox kernel), and
``%%sandbox [--out NAME]``, which runs its cell as bash in the sandbox, carrying environment and
shell state from one ``%%sandbox`` cell to the next exactly as the kernel does. Teaching cells
are ``%%sandbox_python3``, ``%%sandbox_c``...: ``%%python3``, ``%%perl`` and ``%%bash`` belong
to IPython and keep running locally.

Magics return Python objects (``specs = %sandbox_specs``) that display as the magic's table.

Local paths the magics read and write stay inside the folder IPython was in when the extension
was loaded, unless ``SANDBOX_ALLOW_HOST_PATHS=1``. Here this only guards against mistakes: a
Python cell reaches the whole machine anyway.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.display import publish_display_data

from . import magics
from .session import CellOutcome
from .session.context import OperationFailed, SandboxContext
from .session.local_paths import IPYTHON_SWITCH, HostPathRefused
from .settings import IPYTHON_NAMES
from .views import render
from .views.render import Bundle

_CONTEXTS: dict[int, SandboxContext] = {}


def context_of(shell: InteractiveShell) -> SandboxContext:
    """The sandbox context of this IPython shell (connected on first use)."""
    context = _CONTEXTS.get(id(shell))
    if context is None:
        context = _CONTEXTS[id(shell)] = SandboxContext(
            names=IPYTHON_NAMES, host_paths_switch=IPYTHON_SWITCH
        )
        context.teaching_prefix = "sandbox_"
        atexit.register(context.close)
    return context


def load_ipython_extension(shell: InteractiveShell) -> None:
    context_of(shell)  # the local folder of the magics is the one the extension is loaded in
    register: Any = shell.register_magic_function  # IPython's stub mistypes it
    for magic in magics.REGISTRY.values():
        # Teaching cells (%%c...) get the prefix: %%python3 and %%perl are IPython's own.
        name = magic.name if magic.name.startswith("sandbox") else f"sandbox_{magic.name}"
        register(_adapter(shell, magic), magic_kind=magic.kind, magic_name=name)
    register(_sandbox_cell(shell), magic_kind="cell", magic_name="sandbox")
    shell.events.register("post_run_cell", lambda result: _cell_done(shell))


def _cell_done(shell: InteractiveShell) -> None:
    context = _CONTEXTS.get(id(shell))
    if context is not None and context.started:
        context.cell_done()


def unload_ipython_extension(shell: InteractiveShell) -> None:
    context = _CONTEXTS.pop(id(shell), None)
    if context is not None:
        context.close()


def _adapter(shell: InteractiveShell, magic: magics.Magic) -> Any:
    def run(line: str, cell: str | None = None) -> Any:
        try:
            result = magic.run(context_of(shell), line, cell)
        except (magics.MagicUsageError, OperationFailed, HostPathRefused) as problem:
            raise UsageError(str(problem)) from None
        if result.script is not None:  # a teaching cell: its output is shown already
            outcome = _run_cell(shell, result.script)
            if result.then is None or not outcome.ran:
                return _ShownOutcome(**vars(outcome))  # no --check, or the script never ran
            try:
                result = result.then(outcome)  # its --check
            except (magics.MagicUsageError, OperationFailed) as problem:
                raise UsageError(str(problem)) from None
        if result.view is not None:
            publish_display_data(result.view._repr_mimebundle_())  # type: ignore[no-untyped-call]
            result.view.start()
            return None
        return _shown(result.value, result.bundles)

    run.__doc__ = f"{magic.summary}\n\n{magic.parser.format_help()}"
    return run


def _shown(value: Any, bundles: list[Bundle]) -> Any:
    """``value``, displaying as the magic's bundle when it is the only one: one output, and
    ``x = %magic`` still gives the value (a dict, a list, a typed fact...). A magic with
    several bundles has them displayed and gives None (none of the magics has today)."""
    if value is not None and len(bundles) == 1:
        shown = _displaying(value, bundles[0])
        if shown is not None:
            return shown
    for bundle in bundles:
        publish_display_data(bundle)  # type: ignore[no-untyped-call]
    return None if bundles else value


def _displaying(value: Any, bundle: Bundle) -> Any:
    """A copy of ``value`` of a subclass that displays as ``bundle``; None if it cannot be."""
    kind = _SHOWN_TYPES.get(type(value))
    if kind is not None:
        shown = kind(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        shown_class = type(f"Shown{type(value).__name__}", (_Shown, type(value)), {})
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        shown = shown_class(**fields)
    else:
        return None
    object.__setattr__(shown, "sandbox_bundle", bundle)  # frozen dataclasses too
    return shown


class _Shown:
    """A magic's value that IPython displays as the magic's table or line."""

    sandbox_bundle: Bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Bundle:
        return dict(self.sandbox_bundle)


class _ShownOutcome(CellOutcome):
    """A teaching cell's outcome (``outcome = %%sandbox_c ...`` gives it), which adds no
    ``Out[]`` to the notebook: the cell's output was streamed and shown already."""

    def _ipython_display_(self) -> None:
        pass


class ShownDict(_Shown, dict):  # type: ignore[type-arg]
    pass


class ShownList(_Shown, list):  # type: ignore[type-arg]
    pass


class ShownFloat(_Shown, float):
    pass


class ShownStr(_Shown, str):
    pass


_SHOWN_TYPES: dict[type, type[Any]] = {
    dict: ShownDict,
    list: ShownList,
    float: ShownFloat,
    str: ShownStr,
}


def _sandbox_cell(shell: InteractiveShell) -> Any:
    parser = argparse.ArgumentParser(prog="%%sandbox", add_help=False)
    parser.add_argument("--out", metavar="NAME", help="store the execution result in NAME")

    def sandbox(line: str, cell: str) -> None:
        """Run the cell as bash in the sandbox (environment and shell state carried across
        %%sandbox cells); --out NAME keeps the result object in NAME.

        Usage: %%sandbox [--out NAME]
        """
        try:
            args, unknown = parser.parse_known_args(shlex.split(line))
        except (SystemExit, ValueError):
            raise UsageError("usage: %%sandbox [--out NAME]") from None
        if unknown or (args.out and not args.out.isidentifier()):
            raise UsageError("usage: %%sandbox [--out NAME] (NAME a Python identifier)")
        outcome = _run_cell(shell, cell)
        if args.out:
            shell.user_ns[args.out] = outcome

    return sandbox


def _run_cell(shell: InteractiveShell, code: str) -> CellOutcome:
    outcome: CellOutcome = context_of(shell).session.run_cell(code)
    if outcome.stdout:
        sys.stdout.write(outcome.stdout)
        sys.stdout.flush()
    if outcome.stderr:
        sys.stderr.write(outcome.stderr)
        sys.stderr.flush()
    for display in outcome.displays:
        bundle = render.file_bundle(display.name, display.mime, display.data)
        publish_display_data(bundle)  # type: ignore[no-untyped-call]
    for notice in outcome.notices:  # after the cell's own output: they are about it
        print(notice, file=sys.stderr)
    if outcome.error is not None:
        error = outcome.error
        print("\n".join([f"{error.ename}: {error.evalue}", *error.advice]), file=sys.stderr)
    return outcome

"""``sandbox-kernel demo``: the demo notebooks run headless (nbclient) against a sandbox, the
executed copies written, a line printed per notebook."""

# nbformat is not typed: calls into it cannot be checked.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .._errors import SandboxConfigError
from ..settings import COMMAND_NAMES, Resolved, SandboxSettings, Source, resolve
from .notebooks import DEMO_FILES, DEMO_NOTEBOOKS, demo_notebooks_folder, write_file
from .options import given_token
from .prerequisites import ensure_kernelspec, require
from .processes import StopSignals, stopped_by
from .terminal import say


def _demo_paths(given: Path | None) -> tuple[Path, list[Path]]:
    """The notebooks ``demo`` runs: every one of ``given``, else the demo notebooks only."""
    if given is not None:
        folder = given.resolve()
        return folder, sorted(folder.glob("*.ipynb"))
    source = demo_notebooks_folder()
    if source is None:
        return Path("notebooks"), []
    return source, [source / name for name in DEMO_NOTEBOOKS]


def demo(args: argparse.Namespace) -> int:
    if not require("nbclient"):
        return 2
    try:
        token = given_token(args)
    except ValueError as error:
        print(f"sandbox-kernel demo: {error}", file=sys.stderr)
        return 2
    notebooks, paths = _demo_paths(args.notebooks)
    if not paths:
        print(f"sandbox-kernel demo: no notebooks in {notebooks}; give a folder with "
              "--notebooks", file=sys.stderr)  # fmt: skip
        return 2
    output = (args.output or Path.cwd() / "sandbox-kernel-demo").resolve()
    resolved: Resolved | None = None
    with StopSignals() as signals:
        try:
            resolved = resolve(args.url, token, names=COMMAND_NAMES)
            return _run_demo(resolved.settings, notebooks, paths, output, args.timeout)
        except KeyboardInterrupt as interrupt:
            signals.ignore()
            say(f"\n{stopped_by(interrupt)}: stopping the demo")
            return 130
        except SandboxConfigError as error:
            print(f"sandbox-kernel demo: {error}", file=sys.stderr)
            return 2
        except RuntimeError as error:  # the embedded server did not start
            print(f"sandbox-kernel demo: {error}", file=sys.stderr)
            return 1
        finally:
            signals.ignore()
            if resolved is not None:
                resolved.close()


def _run_demo(
    settings: SandboxSettings, notebooks: Path, paths: list[Path], output: Path, timeout: float
) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    output.mkdir(parents=True, exist_ok=True)
    for name in DEMO_FILES:  # the tables the notebooks read beside them (5-checking)
        if (notebooks / name).is_file():
            write_file(output / name, (notebooks / name).read_bytes())
    print(f"notebooks: {notebooks}\nexecuted copies: {output}")
    described = settings.describe()
    if settings.source is Source.EMBEDDED:
        described = "a private embedded server, started for this demo (stopped at its end)"
    failures = 0
    with _environ({"SANDBOX_URL": settings.url, "SANDBOX_TOKEN": settings.token or ""}):
        ensure_kernelspec()
        print(f"sandbox:   {settings.url} ({described})", flush=True)
        for path in paths:
            notebook = nbformat.read(path, as_version=4)
            started = time.monotonic()
            client = NotebookClient(
                notebook, timeout=timeout, store_widget_state=True,
                resources={"metadata": {"path": str(output)}},
            )  # fmt: skip
            problem = ""
            try:
                client.execute()
            except CellExecutionError as error:
                problem = str(error).strip().splitlines()[-1][:200]
            except Exception as error:  # a kernel that died, a timeout: report and go on
                problem = f"{type(error).__name__}: {error}"[:200]
            nbformat.write(notebook, output / path.name)
            ran, errors = _count(notebook)
            failures += bool(problem)
            verdict = f"FAILED: {problem}" if problem else "ok"
            print(f"{path.name}: {ran} cells run, {errors} errors, "
                  f"{time.monotonic() - started:.1f} s, {verdict}", flush=True)  # fmt: skip
    return 1 if failures else 0


def _count(notebook: object) -> tuple[int, int]:
    cells = [c for c in notebook.cells if c.cell_type == "code"]  # type: ignore[attr-defined]
    ran = sum(1 for c in cells if c.get("execution_count"))
    errors = sum(1 for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error")
    return ran, errors


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)

"""The ``sandbox-kernel`` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator
from typing import Any

from . import __version__

#: Exit status of ``run`` when the sandbox itself failed (timeout, lost result...), as
#: ``timeout(1)`` uses 124 for a timeout.
EXIT_TIMEOUT = 124
EXIT_SANDBOX_ERROR = 125


def _add_sandbox_options(parser: argparse.ArgumentParser) -> None:
    from .lab import add_token_options

    parser.add_argument(
        "--url",
        help="sandbox URL (default: SANDBOX_URL, a local server "
        "advertised by 'sandbox-kernel serve', else a private embedded one)",
    )
    add_token_options(parser)


def build_parser() -> argparse.ArgumentParser:
    from .install import add_arguments as add_install_arguments
    from .lab import add_arguments as add_lab_arguments
    from .server import add_arguments as add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="sandbox-kernel",
        description="Run notebook cells as bash in a code sandbox (PremierLangage protocol).",
    )
    parser.add_argument("--version", action="version", version=f"sandbox-kernel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the embedded sandbox server",
        description="Run the embedded sandbox server.",
    )
    add_serve_arguments(serve)

    run = commands.add_parser(
        "run",
        help="run one command in the sandbox and print its output",
        description="Run one command in the configured sandbox (the embedded one by default) "
        "and print its output. Example: sandbox-kernel run -- 'uname -a; python3 --version'",
    )
    _add_sandbox_options(run)
    run.add_argument("--environment", metavar="UUID", help="start from this saved environment")
    run.add_argument(
        "--save",
        action="store_true",
        help="keep the working directory; its uuid is printed on stderr",
    )
    run.add_argument("--timeout", type=float, help="seconds (capped by the server's budget)")
    run.add_argument("words", nargs=argparse.REMAINDER, metavar="-- COMMAND...")

    install = commands.add_parser(
        "install",
        help="install the Sandbox kernelspec for Jupyter",
        description="Install the 'sandbox' kernelspec pointing at this Python. Default: "
        "--sys-prefix inside a virtual environment, --user otherwise.",
    )
    add_install_arguments(install)

    lab = commands.add_parser(
        "lab",
        help="the whole thing: sandbox, kernelspec and JupyterLab on the notebooks",
        description="Start the embedded sandbox (unless --url or SANDBOX_URL), install the "
        "Sandbox kernelspec if missing, and start JupyterLab on notebooks/. Ctrl-C stops all.",
    )
    add_lab_arguments(lab, demo=False)
    demo = commands.add_parser(
        "demo",
        help="run every notebook headless and say how each went",
        description="Run every notebook of notebooks/ headless (nbclient) against the sandbox, "
        "write the executed copies and print one line per notebook.",
    )
    add_lab_arguments(demo, demo=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .server import run as run_server

        return run_server(args)
    if args.command == "install":
        from .install import run as run_install

        return run_install(args)
    if args.command in ("lab", "demo"):
        from . import lab

        return lab.lab(args) if args.command == "lab" else lab.demo(args)
    return _run(parser, args)


@contextlib.contextmanager
def _sandbox(url: str | None, token: str | None) -> Iterator[Any]:
    """A client for the configured sandbox; a private embedded server if none is configured."""
    from .client import Sandbox
    from .discovery import EmbeddedServer, configured_sandbox

    info = configured_sandbox(url, token)
    if info is not None:
        with Sandbox(info.url, token=info.token) as sandbox:
            yield sandbox
        return
    with EmbeddedServer() as server, Sandbox(server.url, token=server.token) as sandbox:
        yield sandbox


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._errors import SandboxError
    from .lab import given_token

    words = args.words[1:] if args.words[:1] == ["--"] else args.words
    if not words:
        parser.error("give the command after --, e.g. sandbox-kernel run -- echo hello")
    # One word is a shell line as typed ('ls; pwd'); several are quoted like a command line.
    command: Any = words[0] if len(words) == 1 else shlex.join(words)
    if args.timeout is not None:
        command = {"command": command, "timeout": args.timeout}
    config: dict[str, Any] = {"commands": [command], "save": args.save}
    if args.environment:
        config["environment"] = args.environment
    try:
        token = given_token(args)
    except ValueError as error:
        print(f"sandbox-kernel run: {error}", file=sys.stderr)
        return 2
    try:
        with _sandbox(args.url, token) as sandbox:
            response = sandbox.execute(config)
    except (SandboxError, RuntimeError) as error:
        print(f"sandbox-kernel run: {error}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    return _report(response)


def _report(response: dict[str, Any]) -> int:
    for entry in response.get("execution", []):
        if entry.get("stdout"):
            print(entry["stdout"])
        if entry.get("stderr"):
            print(entry["stderr"].rstrip("\n"), file=sys.stderr)
    if response.get("environment"):
        print(
            f"environment: {response['environment']} (expires {response.get('expire')})",
            file=sys.stderr,
        )
    status = int(response.get("status", 0))
    if status == -2:
        return EXIT_TIMEOUT
    if status < 0:
        print(f"sandbox-kernel run: the sandbox reported status {status}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    return status


if __name__ == "__main__":
    sys.exit(main())

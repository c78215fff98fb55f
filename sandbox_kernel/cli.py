"""The ``sandbox-kernel`` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .client import Sandbox
    from .settings import SandboxSettings

#: Exit status of ``run`` when the sandbox itself failed (timeout, lost result...), as
#: ``timeout(1)`` uses 124 for a timeout.
EXIT_TIMEOUT = 124
EXIT_SANDBOX_ERROR = 125


def _add_sandbox_options(parser: argparse.ArgumentParser) -> None:
    from .lab import add_token_options

    parser.add_argument(
        "--url",
        help="sandbox URL (default: SANDBOX_URL, a local server advertised by "
        "'sandbox-kernel serve' or 'lab', else a private embedded one)",
    )
    add_token_options(parser)


def build_parser() -> argparse.ArgumentParser:
    from .grading import add_arguments as add_grade_arguments
    from .install import add_arguments as add_install_arguments
    from .lab import add_arguments as add_lab_arguments
    from .server import add_arguments as add_serve_arguments
    from .server import add_worker_arguments

    parser = argparse.ArgumentParser(
        prog="sandbox-kernel",
        description="Run notebook cells as bash in a code sandbox (PremierLangage protocol).",
    )
    parser.add_argument("--version", action="version", version=f"sandbox-kernel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the embedded sandbox server",
        description="Run the embedded sandbox server. Options may also come from a file: "
        "@FILE reads one option or value per line (so that a secret, such as the cluster's "
        "Redis password, need not appear on the command line, where ps shows it).",
        fromfile_prefix_chars="@",
    )
    add_serve_arguments(serve)

    worker = commands.add_parser(
        "worker",
        help="run a worker of a sandbox cluster",
        description="Run a worker of a sandbox cluster: it takes execute/ jobs from the "
        "cluster's task engine on Redis (--cluster) and keeps environments in S3-API storage "
        "(--storage), with the sandboxes, limits and caps of serve. Example: sandbox-kernel "
        "worker --cluster redis://:PASSWORD@10.0.0.5:6379/0 --storage s3://sandbox/class1 "
        "--workers 4. @FILE reads options from FILE, one per line, as for serve.",
        fromfile_prefix_chars="@",
    )
    add_worker_arguments(worker)

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
    run.add_argument(
        "--timeout",
        type=float,
        help="seconds the command may run (capped by the server's budget); the answer is "
        "awaited that long plus a margin",
    )
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
        description="Use the sandbox of --url, SANDBOX_URL or a local server advertised by "
        "'serve' or another 'lab' (else start the embedded one and advertise it while lab "
        "runs), install the Sandbox kernelspec if missing, copy the demo notebooks once into "
        "sandbox-kernel/notebooks/ of the Jupyter data directory (never overwriting your "
        "changes) and start JupyterLab there (or on --dir). Ctrl-C, SIGTERM or SIGHUP stop "
        "JupyterLab, its kernels and the server lab started.",
    )
    add_lab_arguments(lab, demo=False)
    demo = commands.add_parser(
        "demo",
        help="run every notebook headless and say how each went",
        description="Run the demo notebooks (or every notebook of --notebooks) headless "
        "(nbclient) against the sandbox, write the executed copies and print one line per "
        "notebook.",
    )
    add_lab_arguments(demo, demo=True)

    grade = commands.add_parser(
        "grade",
        help="grade a class's notebooks with hidden test tables, into a CSV",
        description="Run each submitted notebook headless in its own Sandbox kernel (whatever "
        "kernel it names), in an empty temporary folder, with the magics that touch local "
        "files or change the sandbox disabled; after the cell tagged check:NAME, run the "
        "table NAME.yaml of --tests in that cell's environment. Writes one row per notebook: each "
        "question's points, total, max, cases passed and failed, status. Example: "
        "sandbox-kernel grade submissions/*.ipynb --tests tests/ --output grades.csv",
    )
    add_grade_arguments(grade)
    _add_sandbox_options(grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .server import run as run_server

        return run_server(args)
    if args.command == "worker":
        from .server.cluster.worker import run_worker

        return run_worker(args)
    if args.command == "install":
        from .install import run as run_install

        return run_install(args)
    if args.command in ("lab", "demo"):
        from . import lab

        return lab.lab(args) if args.command == "lab" else lab.demo(args)
    if args.command == "grade":
        from . import grading

        return grading.run(args)
    return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._errors import SandboxConfigError, SandboxError
    from .lab import given_token
    from .settings import resolve

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
        resolved = resolve(args.url, token)
    except (ValueError, SandboxConfigError) as error:  # a token file, a URL, a timeout
        print(f"sandbox-kernel run: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the private embedded server did not start
        print(f"sandbox-kernel run: {error}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    try:
        with contextlib.closing(resolved), _client(resolved.settings, args.timeout) as sandbox:
            response = sandbox.execute(config)
    except SandboxConfigError as error:  # refused before sending: a usage error
        print(f"sandbox-kernel run: {error}", file=sys.stderr)
        return 2
    except (SandboxError, RuntimeError) as error:
        print(f"sandbox-kernel run: {error}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    return _report(response)


def _client(settings: SandboxSettings, command_timeout: float | None) -> Sandbox:
    """A client for ``settings`` that waits for the answer at least as long as the command
    may run (``run --timeout`` is the command's limit, not the client's)."""
    from ._wire import EXECUTE_MARGIN
    from .client import Sandbox

    timeout = settings.timeout
    if command_timeout is not None:
        timeout = max(timeout, command_timeout + EXECUTE_MARGIN)
    return Sandbox(settings.url, timeout=timeout, token=settings.token,
                   timeout_setting=settings.timeout_setting,
                   advise=settings.refusal_advice)  # fmt: skip


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

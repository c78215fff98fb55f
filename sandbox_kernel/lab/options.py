"""The options of ``sandbox-kernel lab`` and ``sandbox-kernel demo`` (and the token options,
which ``sandbox-kernel run`` shares)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..discovery import token_from_options


def add_arguments(parser: argparse.ArgumentParser, demo: bool) -> None:
    parser.add_argument("--url", help="use this sandbox instead of the embedded one")
    add_token_options(parser)
    if demo:
        parser.add_argument(
            "--notebooks",
            type=Path,
            help="run every notebook of this folder (default: the demo notebooks)",
        )
        parser.add_argument(
            "--output", type=Path, help="where executed copies go (default: ./sandbox-kernel-demo)"
        )
        parser.add_argument("--timeout", type=float, default=300,
                            help="seconds a cell may take (default 300)")  # fmt: skip
    else:
        parser.add_argument(
            "--dir",
            "--notebooks",
            dest="dir",
            type=Path,
            metavar="DIR",
            help="open JupyterLab on this folder as it is (created if missing; nothing is "
            "copied into it). Default: your copies of the demo notebooks, in "
            "sandbox-kernel/notebooks/ of the Jupyter data directory",
        )
        parser.add_argument(
            "--port", type=_port, default=8888, help="JupyterLab's port (next free one if taken)"
        )
        parser.add_argument("--no-browser", action="store_true", help="do not open a browser")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0: any free one)")
    return port


def add_token_options(parser: argparse.ArgumentParser) -> None:
    """``--token-file PATH`` and ``--token T`` (one of them) for a sandbox given by URL."""
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file holding the sandbox's token, mode 0600 (a server's advertisement file "
        "works too). Default: SANDBOX_TOKEN, or the token of the server found",
    )
    tokens.add_argument(
        "--token",
        help="the sandbox's token. WARNING: every local user sees a command line (ps); prefer "
        "--token-file or SANDBOX_TOKEN",
    )


def given_token(args: argparse.Namespace) -> str | None:
    """The token of ``--token`` or ``--token-file``; ValueError says why a file is unusable."""
    token: str | None = args.token
    token_file: Path | None = args.token_file
    return token_from_options(token, token_file)

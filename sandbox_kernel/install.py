"""Install the Sandbox kernelspec: `sandbox-kernel install`, `python -m sandbox_kernel.install`.

The spec (``kernelspec/``: kernel.json and logos) is written with ``argv[0]`` set to the current
interpreter, so that the kernel runs in the environment it was installed from. With no flag,
``--sys-prefix`` inside a virtual environment and ``--user`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "sandbox"
DISPLAY_NAME = "Sandbox (bash)"


def in_virtualenv() -> bool:
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user (~/.local/share)")
    where.add_argument(
        "--sys-prefix", action="store_true", help="into this Python environment (sys.prefix)"
    )
    where.add_argument("--prefix", metavar="P", help="under prefix P (share/jupyter/kernels)")
    parser.add_argument("--name", default=KERNEL_NAME, help=f"kernel name (default {KERNEL_NAME})")


def install(user: bool = False, prefix: str | None = None, name: str = KERNEL_NAME) -> str:
    """Install the spec; returns the directory it went to."""
    source = resources.files("sandbox_kernel").joinpath("kernelspec")
    with tempfile.TemporaryDirectory() as staging:
        target = Path(staging)
        for entry in source.iterdir():
            if entry.name.endswith((".png", ".svg")):
                with resources.as_file(entry) as path:
                    shutil.copy(path, target / entry.name)
        spec = json.loads(source.joinpath("kernel.json").read_text())
        spec["argv"][0] = sys.executable
        if name != KERNEL_NAME:
            spec["display_name"] = f"{DISPLAY_NAME} [{name}]"
        (target / "kernel.json").write_text(json.dumps(spec, indent=2))
        return KernelSpecManager().install_kernel_spec(
            str(target), kernel_name=name, user=user, prefix=prefix
        )


def run(args: argparse.Namespace) -> int:
    prefix = args.prefix
    user = args.user
    if args.sys_prefix or (not user and prefix is None and in_virtualenv()):
        prefix = sys.prefix
    elif prefix is None:
        user = True
    try:
        destination = install(user=user, prefix=prefix, name=args.name)
    except OSError as error:
        print(f"sandbox-kernel install: {error}. Try --user, or --prefix DIR.", file=sys.stderr)
        return 1
    print(f"Installed the kernelspec {args.name!r} ({DISPLAY_NAME}) in {destination}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox_kernel.install", description="Install the Sandbox kernelspec."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""What both commands need before they start: their extra installed, the Sandbox kernelspec
seen by Jupyter."""

from __future__ import annotations

import sys

from ..install import KERNEL_NAME, in_virtualenv, install


def ensure_kernelspec() -> str:
    """Install the Sandbox kernelspec into this environment if Jupyter does not see it."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL_NAME in KernelSpecManager().find_kernel_specs():
        return "already installed"
    if in_virtualenv():
        return install(prefix=sys.prefix)
    return install(user=True)


def require(module: str) -> bool:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        print(f"sandbox-kernel: {module} is not installed. Install the extra: "
              "pip install 'sandbox-kernel[lab]' (or pip install -e '.[lab]' in a clone).",
              file=sys.stderr)  # fmt: skip
        return False
    return True

"""sandbox-kernel: notebook cells run as bash in a PremierLangage-protocol code sandbox.

The public surface is small: the client :class:`Sandbox` (and :class:`AsyncSandbox`, the same
on asyncio), the typed facts it gives (:class:`Specs`, :class:`Load`, :class:`Inventory`) and
its exceptions. They are loaded on first
use, so that the embedded server (a subpackage) does not import the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._errors import (
        SandboxConfigError,
        SandboxConnectionError,
        SandboxError,
        SandboxHTTPError,
        SandboxProtocolError,
        SandboxStreamRefused,
        SandboxTimeout,
    )
    from ._generations import Inventory, Library, Load, Specs
    from .async_client import AsyncSandbox
    from .client import Sandbox

_LAZY = {
    "AsyncSandbox": ".async_client",
    "Inventory": "._generations",
    "Library": "._generations",
    "Load": "._generations",
    "Sandbox": ".client",
    "SandboxConfigError": "._errors",
    "SandboxConnectionError": "._errors",
    "SandboxError": "._errors",
    "SandboxHTTPError": "._errors",
    "SandboxProtocolError": "._errors",
    "SandboxStreamRefused": "._errors",
    "SandboxTimeout": "._errors",
    "Specs": "._generations",
}

__all__ = [
    "AsyncSandbox",
    "Inventory",
    "Library",
    "Load",
    "Sandbox",
    "SandboxConfigError",
    "SandboxConnectionError",
    "SandboxError",
    "SandboxHTTPError",
    "SandboxProtocolError",
    "SandboxStreamRefused",
    "SandboxTimeout",
    "Specs",
    "__version__",
]


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext sandbox_kernel``: the sandbox magics in an IPython (Python) kernel."""
    from .ipython import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    from .ipython import unload_ipython_extension as unload

    unload(shell)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sandbox_kernel' has no attribute {name!r}")

"""sandbox-kernel: notebook cells run as bash in a PremierLangage-protocol code sandbox.

The public surface is small: the client :class:`Sandbox` and its exceptions. They are loaded
on first use, so that the embedded server (a subpackage) does not import the client.
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
        SandboxTimeout,
    )
    from .client import Sandbox

_LAZY = {
    "Sandbox": ".client",
    "SandboxConfigError": "._errors",
    "SandboxConnectionError": "._errors",
    "SandboxError": "._errors",
    "SandboxHTTPError": "._errors",
    "SandboxProtocolError": "._errors",
    "SandboxTimeout": "._errors",
}

__all__ = [
    "Sandbox",
    "SandboxConfigError",
    "SandboxConnectionError",
    "SandboxError",
    "SandboxHTTPError",
    "SandboxProtocolError",
    "SandboxTimeout",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sandbox_kernel' has no attribute {name!r}")

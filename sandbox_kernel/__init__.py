"""sandbox-kernel: notebook cells run as bash in a PremierLangage-protocol code sandbox.

The public surface is small: the client :class:`Sandbox` and its exceptions. The kernel, the
magics and the embedded server live in their own modules.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._errors import (
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxHTTPError,
    SandboxProtocolError,
    SandboxTimeout,
)
from .client import Sandbox

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

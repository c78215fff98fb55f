"""Rules of a connection shared by the front-ends: which local paths magics may touch, how each
front-end says to allow more, and which URLs count as the configured sandbox's origin.

See :class:`sandbox_kernel.session.context.SandboxContext`, which applies them.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

#: The environment variable that lets magics read and write local files anywhere.
ALLOW_HOST_PATHS_VARIABLE = "SANDBOX_ALLOW_HOST_PATHS"
#: How to lift the restriction, as each front-end says it.
KERNEL_SWITCH = (
    "c.SandboxKernel.allow_host_paths = True (in ipython_kernel_config.py of the IPython "
    f"profile, ~/.ipython/profile_default/) or {ALLOW_HOST_PATHS_VARIABLE}=1 in the "
    "environment Jupyter starts the kernel with, then restart the kernel"
)
IPYTHON_SWITCH = (
    f"{ALLOW_HOST_PATHS_VARIABLE}=1 in this Python kernel's environment "
    f"(%env {ALLOW_HOST_PATHS_VARIABLE}=1)"
)


class HostPathRefused(PermissionError):
    """A magic was asked to read or write a local path outside the notebook's folder; the
    message names the path, the folder, and the switch that allows it. Nothing was sent and
    nothing was written."""


def host_paths_allowed_by_environment() -> bool:
    """``SANDBOX_ALLOW_HOST_PATHS=1`` (or true/yes)."""
    value = os.environ.get(ALLOW_HOST_PATHS_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes")


def same_origin(first: str, second: str) -> bool:
    """Scheme, host and port equal (the default port of the scheme when none is given)."""
    try:
        a, b = urlsplit(first.strip()), urlsplit(second.strip())
        ports = {"http": 80, "https": 443}
        return (
            a.scheme.lower() == b.scheme.lower()
            and (a.hostname or "") == (b.hostname or "")
            and (a.port or ports.get(a.scheme.lower())) == (b.port or ports.get(b.scheme.lower()))
        )
    except ValueError:  # a port that is not a number
        return False

"""Which local paths magics may touch, and how each front-end says to allow more.

Magic lines run on the user's machine, and a notebook may come from anyone: local paths stay
inside the folder the front-end started in unless the user allows more.
:meth:`sandbox_kernel.session.context.SandboxContext.local_path` applies the rule.
"""

from __future__ import annotations

import os

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

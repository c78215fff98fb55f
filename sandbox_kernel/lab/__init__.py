"""``sandbox-kernel lab`` and ``sandbox-kernel demo``: the whole thing, started from one command.

``lab`` finds its sandbox as every front-end does (:func:`sandbox_kernel.settings.resolve`:
``--url``, ``SANDBOX_URL``, a local server advertised by ``serve`` or by another ``lab``), else
starts the embedded server and advertises it while it runs, as started by ``sandbox-kernel lab``
(so that ``%sandbox_status`` and other local clients can say whose server it is). It installs
the Sandbox kernelspec if it is missing, copies the demo notebooks once into a work folder of
the Jupyter data directory (a user's saved notebooks never land in the project's
``notebooks/``), and starts JupyterLab there. Ctrl-C, SIGTERM and SIGHUP all stop JupyterLab,
its kernels and the server ``lab`` started, in that order.

``demo`` runs the demo notebooks headless (nbclient) against the same kind of sandbox, writes
the executed copies, and prints a line per notebook: the main job for someone without a
browser.
"""

from .headless import demo
from .jupyterlab import ANNOUNCEMENTS_PLUGIN, JUPYTERLAB_GRACE
from .launch import lab
from .notebooks import (
    DEMO_NOTEBOOKS,
    CopyReport,
    copy_notebooks,
    demo_notebooks_folder,
    manifest_path,
    work_folder,
)
from .options import add_arguments, add_token_options, given_token
from .prerequisites import ensure_kernelspec
from .processes import SURVIVOR_GRACE, StopSignal, StopSignals
from .sandbox import STARTED_BY, LabSandbox, found_sandbox, start_advertised_server

__all__ = [
    "ANNOUNCEMENTS_PLUGIN",
    "DEMO_NOTEBOOKS",
    "JUPYTERLAB_GRACE",
    "STARTED_BY",
    "SURVIVOR_GRACE",
    "CopyReport",
    "LabSandbox",
    "StopSignal",
    "StopSignals",
    "add_arguments",
    "add_token_options",
    "copy_notebooks",
    "demo",
    "demo_notebooks_folder",
    "ensure_kernelspec",
    "found_sandbox",
    "given_token",
    "lab",
    "manifest_path",
    "start_advertised_server",
    "work_folder",
]

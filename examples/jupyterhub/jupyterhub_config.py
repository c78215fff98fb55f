"""JupyterHub for a class, with one sandbox service for every student (issue 16).

Start it from the Python environment where sandbox-kernel and JupyterHub are installed, as
the project's test does (from the repository's checkout; Node.js 20 or later for the proxy):

    pip install -e '.[hub]'                # this project, and jupyterhub
    npm install --prefix build/hub-proxy configurable-http-proxy@5
    PATH=$PWD/build/hub-proxy/node_modules/.bin:$PATH \\
        jupyterhub -f examples/jupyterhub/jupyterhub_config.py

What this file sets up:

- the sandbox server, ``sandbox-kernel serve --hub-auth``, started and stopped by the Hub as a
  managed service named ``sandbox``. The Hub routes ``/services/sandbox/`` to it. The server
  asks the Hub whose token each request carries, so it knows each student by name. It gives
  each student ``--per-user-runs`` runs at a time (more wait in the student's own queue), one
  CPU share per student, and writes one line per run to its run log;
- the Sandbox kernelspec, installed into this Python environment when the Hub starts. Users'
  servers started by a local spawner (LocalProcessSpawner, SystemdSpawner) see it there. For a
  container spawner, run ``sandbox-kernel install --sys-prefix`` in the image instead;
- the ``user`` role gets ``access:services!service=sandbox``: every user may use the sandbox;
- ``c.Spawner.server_token_scopes``: the token a user's server (and so each kernel) gets holds
  JupyterHub's defaults plus that scope. Without it the kernel's token only has the ``server``
  role's scopes, and the sandbox answers 403;
- a ``teacher`` role with the custom scope ``custom:sandbox:teacher``, given to the members of
  the group ``teachers``. For them the sandbox's ``usages/`` lists every student's runs, and the
  panel's Load tab shows the whole class;
- ``c.JupyterHub.public_url``: single-user servers get it as ``JUPYTERHUB_PUBLIC_URL``, and the
  Sandbox kernel finds the sandbox at ``{public URL}services/sandbox/``;
- kernels talk to their servers over Unix sockets, not loopback TCP ports (see below why).

What a site changes comes from environment variables, each with a default for a trial on one
machine (this file need not be edited):

===========================  ================================================================
``SANDBOX_HUB_PUBLIC_URL``   the URL students open (default ``http://127.0.0.1:8000/``)
``SANDBOX_HUB_BIND_URL``     where the Hub's proxy listens (default ``http://:8000/``)
``SANDBOX_HUB_SERVICE_URL``  where the sandbox server listens (default ``http://127.0.0.1:7000``)
``SANDBOX_HUB_DATA_DIR``     the sandbox's saved environments (default ``./sandbox-data``)
``SANDBOX_HUB_RUN_LOG``      the run log, one JSON line per run (default ``./sandbox-runs.jsonl``)
``SANDBOX_HUB_PER_USER_RUNS``  each user's concurrent runs (default 2)
``SANDBOX_HUB_SERVE_ARGS``   more options of ``sandbox-kernel serve``, e.g. ``--workers 16
                             --per-user-storage 200M`` (default none)
``SANDBOX_HUB_TEACHERS``     comma-separated user names of the group ``teachers``
``SANDBOX_HUB_KERNELSPEC_PREFIX``  where the kernelspec goes (default: this environment)
``SANDBOX_HUB_SANDBOX_URL``  the sandbox the kernels use, when it is not this Hub's service
                             (e.g. a cluster's load balancer); the Hub's users' tokens go there
===========================  ================================================================

Relative paths are taken from the folder the Hub starts in, as JupyterHub does for its own
files (jupyterhub.sqlite, jupyterhub_cookie_secret).

Authentication and spawning are JupyterHub's defaults (PAM, LocalProcessSpawner: each
student is a Unix user), and who may log in is yours to say: JupyterHub lets nobody in until
you set ``c.Authenticator.allowed_users`` (the class list, teachers included),
``allow_existing_users`` (users an admin adds) or ``allow_all``. Set them, and your own
authenticator and spawner (``c.JupyterHub.authenticator_class``, ``spawner_class``), below or
in a file that loads this one: ``load_subconfig("/path/to/this/jupyterhub_config.py")`` first,
then your settings. The project's test (``tests/hub/``) does exactly that.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from urllib.parse import urlsplit

# JupyterHub gives get_config to the file it loads.
c = get_config()  # type: ignore[name-defined]  # noqa: F821

log = logging.getLogger("jupyterhub_config")

SERVICE_NAME = "sandbox"
ACCESS_SCOPE = f"access:services!service={SERVICE_NAME}"
TEACHER_SCOPE = "custom:sandbox:teacher"
#: The scopes JupyterHub gives a server's token by default (the ``server`` role's,
#: jupyterhub/roles.py): posting activity, and reaching the user's own server.
DEFAULT_SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server"]


def setting(name: str, default: str) -> str:
    """A site's value: the environment variable ``name``, or ``default`` when it is unset or
    empty."""
    return os.environ.get(name) or default


def site_path(name: str, default: str) -> str:
    """A path setting, made absolute from the folder the Hub starts in: the sandbox service
    and the users' servers run elsewhere."""
    return os.path.abspath(os.path.expanduser(setting(name, default)))


public_url = setting("SANDBOX_HUB_PUBLIC_URL", "http://127.0.0.1:8000/")
service_url = setting("SANDBOX_HUB_SERVICE_URL", "http://127.0.0.1:7000").rstrip("/")
public_host = urlsplit(public_url).hostname or "127.0.0.1"

# -- the Hub and its proxy -------------------------------------------------------------------

c.JupyterHub.bind_url = setting("SANDBOX_HUB_BIND_URL", "http://:8000/")
c.JupyterHub.public_url = public_url

# -- the sandbox, a service the Hub starts and stops -----------------------------------------

serve_command = [
    # The Hub's own interpreter: the sandbox runs from the environment this file is loaded in.
    sys.executable,
    "-m",
    "sandbox_kernel.server",  # = sandbox-kernel serve
    "--hub-auth",
    "--hub-service-name",
    SERVICE_NAME,
    "--per-user-runs",
    setting("SANDBOX_HUB_PER_USER_RUNS", "2"),
    "--data-dir",
    site_path("SANDBOX_HUB_DATA_DIR", "sandbox-data"),
    "--run-log",
    site_path("SANDBOX_HUB_RUN_LOG", "sandbox-runs.jsonl"),
    # Requests come through the Hub's proxy with the public name as their Host.
    "--allowed-host",
    public_host,
    # Users reach it through the Hub with their own tokens: nothing to advertise locally.
    "--no-advertise",
    *shlex.split(setting("SANDBOX_HUB_SERVE_ARGS", "")),
]

c.JupyterHub.services = [
    {
        "name": SERVICE_NAME,
        # Where the sandbox listens; the Hub routes {base_url}services/sandbox/ there and tells
        # the server its URL and prefix (JUPYTERHUB_SERVICE_URL, JUPYTERHUB_SERVICE_PREFIX).
        "url": service_url,
        "command": serve_command,
        # Not a page for users: no link in the Hub's Services menu.
        "display": False,
    }
]

# -- who may use it --------------------------------------------------------------------------

c.JupyterHub.custom_scopes = {
    TEACHER_SCOPE: {
        "description": "See every user's runs and queue in the sandbox's usages/.",
    },
}

c.JupyterHub.load_roles = [
    # JupyterHub's own `user` role ("self") plus the sandbox: every user may use it.
    {"name": "user", "scopes": ["self", ACCESS_SCOPE]},
    {
        "name": "teacher",
        "description": "Sees the whole class in the sandbox's usages/ and panel.",
        "scopes": [TEACHER_SCOPE],
        "groups": ["teachers"],
    },
]

teachers = [name.strip() for name in setting("SANDBOX_HUB_TEACHERS", "").split(",") if name.strip()]
c.JupyterHub.load_groups = {"teachers": {"users": teachers}}

# The token of each user's server, which its kernels inherit (JUPYTERHUB_API_TOKEN). The Hub
# gives it the part of these scopes that the user holds: the teacher scope only to teachers.
c.Spawner.server_token_scopes = [*DEFAULT_SERVER_TOKEN_SCOPES, ACCESS_SCOPE, TEACHER_SCOPE]

# -- the kernels -----------------------------------------------------------------------------

# Kernels talk to their user's server over Unix sockets (IPC), not loopback TCP ports. When a
# class starts kernels at once, servers picking free TCP ports each on their own collide
# ("Address already in use": a kernel dies, and its restarts pick the same cached port), or a
# server connects to another user's kernel. A loopback port is also open to every local user.
# The sockets go into each user's Jupyter runtime directory (~/.local/share/jupyter/runtime),
# which must be short: a socket's path is at most 107 bytes, and the names take 49.
c.Spawner.args.append("--KernelManager.transport=ipc")

#: Variables of every user's server, and so of its kernels.
spawner_environment: dict[str, str] = {}

sandbox_url = os.environ.get("SANDBOX_HUB_SANDBOX_URL")
if sandbox_url:
    # The kernel sends the user's token to the sandbox it is configured with, and only there.
    spawner_environment["SANDBOX_URL"] = sandbox_url


def install_kernelspec(prefix: str) -> None:
    """Install the Sandbox kernelspec under ``prefix`` for every user's server, and tell the
    servers where it is when that is not this environment (``JUPYTER_PATH``)."""
    from sandbox_kernel.install import install

    try:
        where = install(prefix=prefix)
    except OSError as error:
        log.warning(
            "The Sandbox kernelspec could not be installed under %s (%s): run "
            "'sandbox-kernel install --sys-prefix' as the owner of this environment, or set "
            "SANDBOX_HUB_KERNELSPEC_PREFIX to a folder the Hub may write.",
            prefix,
            error,
        )
        return
    log.info("The Sandbox kernelspec is in %s", where)
    if os.path.realpath(prefix) != os.path.realpath(sys.prefix):
        spawner_environment["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")


install_kernelspec(site_path("SANDBOX_HUB_KERNELSPEC_PREFIX", sys.prefix))
# Merged into what a file loading this one may set (update, not replace).
c.Spawner.environment.update(spawner_environment)

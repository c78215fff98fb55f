"""The single server does not pay for the cluster: Celery, Redis and boto3 (about 100 ms of
imports each for boto3 and redis.asyncio) load only in a front or a worker.

Every private server a kernel starts is a ``sandbox-kernel serve``: its first cell waits for
those imports if they ever creep into the single server's path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sandbox_kernel"
CLUSTER_LIBRARIES = ("celery", "kombu", "redis", "boto3", "botocore")


def test_the_single_server_and_the_cli_load_no_cluster_library() -> None:
    script = (
        "import sys\n"
        "import sandbox_kernel.server, sandbox_kernel.cli\n"
        "sandbox_kernel.cli.build_parser()\n"
        "from sandbox_kernel.server import assembled_app, serve\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {CLUSTER_LIBRARIES!r})\n"
        "print(' '.join(loaded))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []


def test_only_the_cluster_package_imports_cluster_libraries() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "server" / "cluster") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(PACKAGE)} imports {name}"
                for name in names
                if name.split(".")[0] in CLUSTER_LIBRARIES
            ]
    assert offenders == []


def test_the_single_server_imports_the_cluster_only_inside_functions() -> None:
    """``server`` chooses the front's assembly with ``--cluster`` (a function-level import);
    a module-level import anywhere outside the package would load it for everyone."""
    offenders = []
    for path in (PACKAGE / "server").rglob("*.py"):
        if (PACKAGE / "server" / "cluster") in path.parents:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and "cluster" in (node.module or ""):
                offenders.append(f"{path.relative_to(PACKAGE)}: from {node.module} import ...")
    assert offenders == []

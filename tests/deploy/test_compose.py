"""The cluster as operators run it (issue 15): the images that ``deploy/build-image`` builds,
brought up by Debian's ``docker-compose`` from ``deploy/compose.yaml`` as written (Redis with
a password, the S3 service, two fronts behind HAProxy, three workers), reached only through
HAProxy on loopback.

A Sandbox kernel runs a carried session of 10 cells there; a worker container is killed
(``docker kill``) in the middle, and the session goes on with nothing lost. Inside the
containers, commands run as ``nobody`` under bubblewrap with the seccomp filter of the isolation
issue (on top of the container's profile), and the servers keep no ``CAP_SYS_ADMIN``.

Needs root, a running Docker engine, ``docker-compose`` and ``debootstrap`` (the base image is
built from Debian's archive, since no registry image can be pulled): ``.ci/run`` installs them
and starts ``dockerd``; the test fails naming what is missing. What it leaves: the images
(``sandbox-kernel*:latest``, rebuilt by the next run); containers, networks and volumes go.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ..conftest import KernelSession
from ..helpers import free_port, kernel_env, wait_until

# The first test builds the images: debootstrap and four builds take minutes on a fresh machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ARTIFACTS = REPO / "tests" / "artifacts"
#: What the test copies to run the compose file away from the checkout (its secrets included).
DEPLOY_FILES = ("compose.yaml", "haproxy.cfg", "seccomp-bubblewrap.json", "make-secrets")
CAP_SYS_ADMIN = 1 << 21
#: io_uring_setup(2): Docker's default profile lets it through, our sandbox filter refuses it.
IO_URING_SETUP_PROBE = (
    "python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
    "print(libc.syscall(425, 1, 0), ctypes.get_errno())'"
)


def _require_tools() -> None:
    missing = [
        f"{tool} ({how})"
        for tool, how in (
            ("docker", "apt-get install -y docker.io"),
            ("docker-compose", "apt-get install -y docker-compose"),
            ("debootstrap", "apt-get install -y debootstrap"),
        )
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.fail(f"the deployment test needs {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.fail("the deployment test builds a Debian root filesystem: run it as root")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        pytest.fail(
            "no Docker engine answers (docker info failed): start one (dockerd &, or "
            f"systemctl start docker). {info.stderr.strip()[-300:]}"
        )


@dataclasses.dataclass
class Deployed:
    url: str
    token: str
    place: Path
    project: str

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.project, *args],
            cwd=self.place,
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )

    def get(self, path: str) -> requests.Response:
        return requests.get(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def execute(self, *commands: str) -> dict[str, Any]:
        response = requests.post(
            self.url + "execute/",
            headers={"Authorization": f"Bearer {self.token}"},
            files={"config": (None, json.dumps({"commands": list(commands)}))},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def running(self, kind: str) -> str:
        """A running container of ``kind`` (front, worker): an earlier test killed one."""
        names = subprocess.run(
            ["docker", "ps", "--filter", f"name={self.project}_{kind}", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert names, f"no {kind} container runs"
        return sorted(names)[0]


@pytest.fixture(scope="module")
def images() -> None:
    _require_tools()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(ARTIFACTS / "deploy-build-image.log", "w") as log:
        built = subprocess.run(
            [str(DEPLOY / "build-image"), "--debootstrap", "--python", sys.executable],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=1200,
        )
    assert built.returncode == 0, (
        "deploy/build-image failed: see tests/artifacts/deploy-build-image.log"
    )
    print(f"images built in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="module")
def deployed(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    place = tmp_path_factory.mktemp("deploy")
    for name in DEPLOY_FILES:
        shutil.copy2(DEPLOY / name, place / name)
    subprocess.run([str(place / "make-secrets")], check=True, capture_output=True)
    port = free_port()
    # The project's own name and port: a developer's running deployment is never touched.
    (place / ".env").write_text(
        (place / ".env").read_text().replace("COMPOSE_PROJECT_NAME=sandbox\n", "")
        + f"SANDBOX_PORT={port}\n"
    )
    cluster = Deployed(
        url=f"http://127.0.0.1:{port}/",
        token=(place / "secrets" / "sandbox_token").read_text().strip(),
        place=place,
        project=f"sktest{uuid.uuid4().hex[:8]}",
    )
    try:
        up = cluster.compose("up", "-d", check=False)
        assert up.returncode == 0, f"docker-compose up failed:\n{up.stderr[-3000:]}"
        assert wait_until(lambda: _workers(cluster) == 3, 120), (
            "the cluster did not answer through HAProxy with 3 workers within 120 s; "
            "see tests/artifacts/deploy-compose.log"
        )
        yield cluster
    finally:
        logs = cluster.compose("logs", "--no-color", check=False)
        (ARTIFACTS / "deploy-compose.log").write_text(logs.stdout + logs.stderr)
        cluster.compose("down", "--volumes", "--remove-orphans", "--timeout", "2", check=False)


def _workers(cluster: Deployed) -> int:
    try:
        response = cluster.get("specifications/")
    except requests.RequestException:
        return 0
    if response.status_code != 200:
        return 0
    return int(response.json().get("cluster", {}).get("workers", 0))


def _holder(cluster: Deployed) -> str:
    """The compose service of the worker caching the most environments (the session's). The
    counts come from the workers' heartbeats, written every 0.25 s: waited for, not read once."""
    workers: list[dict[str, Any]] = []

    def cached() -> bool:
        workers[:] = cluster.get("usages/").json()["workers"]
        return any(worker["cached_environments"] > 0 for worker in workers)

    assert wait_until(cached, 10), workers
    busiest = max(workers, key=lambda worker: worker["cached_environments"])
    return str(busiest["name"]).split("-", 1)[0]  # the name starts with its hostname


def test_a_carried_session_through_haproxy_survives_a_killed_worker(
    deployed: Deployed, kernelspec: str
) -> None:
    kernel = KernelSession(kernel_env(deployed.url, deployed.token))
    seconds: list[float] = []
    try:
        for cell in range(1, 11):
            if cell == 6:
                victim = _holder(deployed)
                subprocess.run(
                    ["docker", "kill", deployed.container(victim)], check=True, capture_output=True
                )
            ran = kernel.run(f"echo cell{cell} >> log; count=$((count + 1)); echo $count")
            assert ran.status == "ok", (cell, ran.stdout, ran.stderr)
            assert ran.stdout.strip() == str(cell), (cell, ran.stdout, ran.stderr)
            seconds.append(ran.seconds)
        ran = kernel.run("cat log")
        assert ran.stdout.split() == [f"cell{cell}" for cell in range(1, 11)]
    finally:
        kernel.stop()
    assert victim.startswith("worker")
    (ARTIFACTS / "deploy-figures.txt").write_text(
        "cells through HAProxy (s): "
        + " ".join(f"{value:.3f}" for value in seconds)
        + f"\nkilled {victim} before cell 6\n"
    )
    assert wait_until(lambda: _workers(deployed) >= 2, 10)


def test_commands_run_as_nobody_under_bubblewrap_and_the_sandbox_filter(
    deployed: Deployed,
) -> None:
    answer = deployed.execute(
        "id -u",
        "grep -E '^Seccomp(_filters)?:' /proc/self/status",
        "tr '\\0' ' ' < /proc/1/cmdline",
        IO_URING_SETUP_PROBE,
    )
    uid, seccomp, init, io_uring = (run["stdout"] for run in answer["execution"])
    assert uid == "65534"
    # Mode 2 (filter); two filters: the container's profile, and the sandbox's own.
    assert seccomp.split() == ["Seccomp:", "2", "Seccomp_filters:", "2"]
    assert init.startswith("bwrap --seccomp "), init
    assert io_uring.split()[1] == "1", f"io_uring_setup was not refused with EPERM: {io_uring}"
    isolation = deployed.get("specifications/").json()["container"]["isolation"]
    assert isolation["method"] == "bubblewrap" and isolation["user"] == "nobody"
    assert isolation["cgroups"], "per-run cgroups are off in the containers"


@pytest.mark.parametrize("kind", ["front", "worker"])
def test_the_servers_in_the_containers_keep_no_cap_sys_admin(deployed: Deployed, kind: str) -> None:
    container = deployed.running(kind)
    status = subprocess.run(
        ["docker", "exec", container, "cat", "/proc/1/status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    capabilities = {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in status.splitlines()
        if line.startswith(("CapEff", "CapBnd", "CapInh", "CapAmb"))
    }
    assert len(capabilities) == 4, status
    assert not any(value & CAP_SYS_ADMIN for value in capabilities.values()), capabilities
    # Docker's container without the profile's help: io_uring_setup gets past it (EFAULT).
    direct = subprocess.run(
        ["docker", "exec", container, "sh", "-c", IO_URING_SETUP_PROBE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert direct.split()[1] == "14", direct

"""The deployment files agree with each other and with what they promise (issue 15): the
seccomp profile adds exactly the calls its reasons file explains, only workers get the
container options, only HAProxy publishes a port (on loopback), and the Kubernetes workers
get the options the compose workers run with. ``tests/deploy/`` runs the compose file for
real; this catches an edit that breaks one file's promise before that slow test runs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ADDED_FOR_BUBBLEWRAP = {"clone", "mount", "pivot_root", "sethostname", "umount2", "unshare"}


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_the_profile_adds_exactly_the_explained_calls_and_denies_by_default() -> None:
    profile = json.loads((DEPLOY / "seccomp-bubblewrap.json").read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    unconditional = [
        rule
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not {"args", "includes", "excludes"} & set(rule)
    ]
    added = [rule for rule in unconditional if "comment" in rule]
    assert len(added) == 1 and set(added[0]["names"]) == ADDED_FOR_BUBBLEWRAP
    others = {name for rule in unconditional if rule not in added for name in rule["names"]}
    assert not others & (ADDED_FOR_BUBBLEWRAP | {"setns", "bpf", "keyctl", "clone3"})
    reasons = (DEPLOY / "seccomp-bubblewrap.md").read_text()
    for name in ADDED_FOR_BUBBLEWRAP:
        assert f"| `{name}`" in reasons, f"{name} has no reason in seccomp-bubblewrap.md"


def test_only_workers_get_the_container_options() -> None:
    services = _compose()["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker")}
    fronts = {name: s for name, s in services.items() if name.startswith("front")}
    assert len(workers) == 3 and len(fronts) == 2
    for worker in workers.values():
        assert "seccomp=./seccomp-bubblewrap.json" in worker["security_opt"]
        assert "apparmor=unconfined" in worker["security_opt"]
        assert worker["cap_add"] == ["SYS_ADMIN"]
        assert worker["command"].startswith("worker @/run/secrets/cluster_args ")
    for front in fronts.values():
        assert "security_opt" not in front and "cap_add" not in front
        assert "--token-file /run/secrets/sandbox_token" in front["command"]


def test_only_haproxy_publishes_a_port_and_on_loopback() -> None:
    services = _compose()["services"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert list(published) == ["haproxy"]
    assert all(str(port).startswith("127.0.0.1:") for port in published["haproxy"])
    config = (DEPLOY / "haproxy.cfg").read_text()
    assert "uri /specifications/" in config and "hdr Host localhost" in config
    for front in ("front1", "front2"):
        assert f"server {front} {front}:8000 check" in config


def test_redis_requires_its_password_from_a_secret() -> None:
    redis = _compose()["services"]["redis"]
    assert redis["command"][:2] == ["redis-server", "/run/secrets/redis.conf"]
    assert "requirepass" in (DEPLOY / "make-secrets").read_text()


def test_kubernetes_workers_get_the_compose_workers_options() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "workers.yaml").read_text()))
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    context = container["securityContext"]
    assert context["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "profiles/seccomp-bubblewrap.json",
    }
    assert context["capabilities"]["add"] == ["SYS_ADMIN"]
    assert context["appArmorProfile"] == {"type": "Unconfined"}
    fronts = yaml.safe_load_all((DEPLOY / "kubernetes" / "fronts.yaml").read_text())
    [front_deployment] = [d for d in fronts if d["kind"] == "Deployment"]
    front = front_deployment["spec"]["template"]["spec"]["containers"][0]
    assert "capabilities" not in front["securityContext"]


def test_the_shell_scripts_parse() -> None:
    for script in ("entrypoint.sh", "build-image", "make-secrets"):
        subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)

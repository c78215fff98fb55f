"""PremierLangage sandbox 2.x: a flat ``specifications/`` that also tells the load, no
``usages/`` (contract, "2.x")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _read
from ._facts import Load, RunLimits, Specs

GENERATION = 2
#: 2.x tells the load in ``specifications/``.
NEEDS_USAGES = False


def matches(specs: Mapping[str, Any]) -> bool:
    """Everything that is not 3.x: the flat shape is the oldest one."""
    return True


def specs(answer: Mapping[str, Any]) -> Specs:
    memory, cpu = _read.section(answer, "memory"), _read.section(answer, "cpu")
    return Specs(
        generation=GENERATION,
        sandbox_version=_read.text(answer.get("sandbox_version")),
        docker_version=_read.text(answer.get("docker_version")),
        containers=_read.integer(_read.section(answer, "containers").get("total")),
        execute_timeout=_read.number(answer.get("execute_timeout")),
        expiration=_read.integer(answer.get("expiration")),
        limits=RunLimits(
            ram=_read.size(memory.get("ram")),
            swap=_read.size(memory.get("swap")),
            storage=_read.size(memory.get("storage")),
            cpus=_read.integer(cpu.get("count")),
            cpu_name=_read.text(cpu.get("name")),
        ),
        isolation=_read.isolation(answer.get("isolation")),
        environ=_read.mapping(answer.get("environ")),
    )


def load(specs: Mapping[str, Any], usages: Mapping[str, Any] | None) -> Load:
    containers = _read.section(specs, "containers")
    return Load(
        busy=_read.integer(containers.get("running")), total=_read.integer(containers.get("total"))
    )


def setting(answer: Mapping[str, Any], key: str) -> Any:
    """A per-container setting as written (the sandbox-api attributes ``s.cpu``...)."""
    return answer.get(key)

"""PremierLangage sandbox 3.x: ``specifications/`` nested under ``host`` and ``container``, the
load in ``usages/`` (contract, "3.x"). Our embedded server answers this shape, plus
``container.execute_timeout``, ``expiration`` and ``isolation`` (docs/protocol-extensions.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _read
from ._facts import Host, Load, RunLimits, Specs

GENERATION = 3
#: The busy containers and the host's use are only in ``usages/`` (2 s on the public server).
NEEDS_USAGES = True


def matches(specs: Mapping[str, Any]) -> bool:
    return isinstance(specs.get("host"), Mapping) or isinstance(specs.get("container"), Mapping)


def specs(answer: Mapping[str, Any]) -> Specs:
    host, container = _read.section(answer, "host"), _read.section(answer, "container")
    memory = _read.section({"memory": setting(answer, "memory")}, "memory")
    cpu = _read.section({"cpu": setting(answer, "cpu")}, "cpu")
    host_cpu, host_memory = _read.section(host, "cpu"), _read.section(host, "memory")
    return Specs(
        generation=GENERATION,
        sandbox_version=_read.text(_host_fact(answer, "sandbox_version")),
        docker_version=_read.text(_host_fact(answer, "docker_version")),
        containers=_read.integer(container.get("count")),
        execute_timeout=_read.number(setting(answer, "execute_timeout")),
        expiration=_read.integer(setting(answer, "expiration")),
        limits=RunLimits(
            ram=_read.size(memory.get("ram")),
            swap=_read.size(memory.get("swap")),
            storage=_read.size(memory.get("storage")),
            processes=_read.size(container.get("process")),
            cpus=_read.integer(cpu.get("count")),
            cpu_seconds=_read.number(cpu.get("time_limit")),
        ),
        host=Host(
            cores=_read.integer(host_cpu.get("core")),
            threads=_read.integer(host_cpu.get("logical")),
            # psutil's cpu_freq() is in MHz; 0.0 means "not known" (containers, VMs).
            max_mhz=_read.number(host_cpu.get("freq_max")) or None,
            ram=_read.integer(host_memory.get("ram")),
            disks={
                str(device): int(space)
                for device, space in _read.section(host_memory, "storage").items()
                if _read.integer(space) is not None
            },
        )
        if host
        else None,
        isolation=_read.isolation(setting(answer, "isolation")),
        environ=_read.mapping(setting(answer, "environ")),
    )


def _host_fact(answer: Mapping[str, Any], key: str) -> Any:
    """A fact of the host: under ``host``, or at the top level (as sandbox-api read it)."""
    host = _read.section(answer, "host")
    return host[key] if key in host else answer.get(key)


def load(specs: Mapping[str, Any], usages: Mapping[str, Any] | None) -> Load:
    usages = usages or {}
    host_memory = _read.section(_read.section(specs, "host"), "memory")
    return Load(
        busy=_read.integer(usages.get("container")),
        total=_read.integer(_read.section(specs, "container").get("count")),
        cpu=_read.number(_read.section(usages, "cpu").get("usage")),
        memory_used=_read.integer(_read.section(usages, "memory").get("ram")),
        memory_total=_read.integer(host_memory.get("ram")),
    )


def setting(answer: Mapping[str, Any], key: str) -> Any:
    """A per-container setting as written (the sandbox-api attributes ``s.cpu``...): under
    ``container``, or at the top level for a server that keeps some there."""
    container = _read.section(answer, "container")
    return container[key] if key in container else answer.get(key)

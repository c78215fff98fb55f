"""How sandbox facts look in a notebook: MIME bundles (HTML and plain text) for the magics.

Pure functions from data to ``{"text/plain": ..., "text/html": ...}``; the front-ends decide
how a bundle is shown.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

Bundle = dict[str, str]
UNKNOWN = "unknown"


def human_bytes(value: object) -> str:
    """``1073741824`` -> ``1.0 GiB``; -1 means no limit; anything else unknown."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return UNKNOWN if value is None else str(value)
    if value < 0:
        return "no limit"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return UNKNOWN  # pragma: no cover


def human_seconds(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return UNKNOWN
    if value >= 86400 and value % 3600 == 0:
        return f"{value / 86400:g} days ({value:g} s)"
    if value >= 3600 and value % 60 == 0:
        return f"{value / 3600:g} h ({value:g} s)"
    return f"{value:g} s"


def human_mhz(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return UNKNOWN
    return f"{value / 1000:.2f} GHz" if value >= 1000 else f"{value:.0f} MHz"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> Bundle:
    """A table as aligned plain text and as HTML."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = [caption] if caption else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r) + "</tr>"
        for r in cells
    )
    caption_html = f"<caption style='text-align:left'>{html.escape(caption)}</caption>"
    return {
        "text/plain": "\n".join(lines),
        "text/html": f"<table>{caption_html if caption else ''}<thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>",
    }


def text(message: str) -> Bundle:
    return {"text/plain": message}


def file_bundle(name: str, mime: str, data: bytes) -> Bundle:
    """A file of the sandbox, shown inline: images base64-encoded, the rest as text."""
    if mime.startswith("image/") and mime != "image/svg+xml":
        return {mime: base64.b64encode(data).decode("ascii"), "text/plain": f"<{name}>"}
    decoded = data.decode("utf-8", errors="replace")
    if mime == "application/json":
        import json

        try:
            return {mime: json.loads(decoded), "text/plain": decoded}
        except ValueError:
            return {"text/plain": decoded}
    return {mime: decoded, "text/plain": decoded if mime == "text/plain" else f"<{name}>"}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def isolation_text(isolation: Mapping[str, Any] | None) -> str:
    if not isolation:
        return UNKNOWN
    if not isolation.get("isolated", False):
        return "NOT ISOLATED (commands can read and write the server's machine)"
    details = [str(isolation.get("method", "isolated"))]
    if isolation.get("cgroups"):
        details.append(str(isolation["cgroups"]))
    if isolation.get("network") is False:
        details.append("no network")
    return ", ".join(details)


def specifications(url: str, specs: Mapping[str, Any], facts: Mapping[str, Any]) -> Bundle:
    """``%sandbox_specs``: ``facts`` are the client's attributes (version-independent)."""
    host = _mapping(specs.get("host"))
    host_cpu, host_memory = _mapping(host.get("cpu")), _mapping(host.get("memory"))
    memory, cpu = _mapping(facts.get("memory")), _mapping(facts.get("cpu"))
    containers, storage = _mapping(facts.get("containers")), _mapping(host_memory.get("storage"))
    rows = [
        ("URL", url),
        ("sandbox version", facts.get("sandbox_version") or UNKNOWN),
        ("isolation", isolation_text(facts.get("isolation"))),
        ("execute timeout", human_seconds(facts.get("execute_timeout"))),
        ("environment expiration", human_seconds(facts.get("expiration"))),
        ("containers", containers.get("total", UNKNOWN)),
        ("memory per run", human_bytes(memory.get("ram"))),
        ("storage per run", human_bytes(memory.get("storage"))),
        ("processes per run", _limit(_mapping(specs.get("container")).get("process"))),
        ("CPU (host)", _cpu(host_cpu, cpu)),
        ("RAM (host)", human_bytes(host_memory.get("ram"))),
        ("disk (host)", ", ".join(f"{d}: {human_bytes(s)}" for d, s in storage.items()) or UNKNOWN),
        ("docker version", facts.get("docker_version") or UNKNOWN),
    ]
    return table(["", "value"], rows, caption="Sandbox specifications")


def _limit(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return "no limit" if value < 0 else str(value)
    return UNKNOWN


def _cpu(host_cpu: Mapping[str, Any], cpu: Mapping[str, Any]) -> str:
    if host_cpu:
        cores = f"{host_cpu.get('core', '?')} cores / {host_cpu.get('logical', '?')} threads"
        return f"{cores}, up to {human_mhz(host_cpu.get('freq_max'))}"
    if cpu:
        return str(cpu.get("name") or f"{cpu.get('count', '?')} CPU")
    return UNKNOWN


def libraries(rows: Sequence[tuple[str, str, str]], total: int, shown_limit: int) -> Bundle:
    """``%sandbox_libraries``: (category, name, version) rows, of ``total`` matches."""
    caption = f"{total} match{'es' if total != 1 else ''}"
    if total > len(rows):
        caption += f" (first {shown_limit} shown: narrow the pattern)"
    return table(["category", "name", "version"], rows, caption=caption)


def usage_line(
    load: float, busy: int | None, total: int | None, cpu: float | None, memory: str | None
) -> Bundle:
    """``%sandbox_usage``: one line with a bar."""
    width = 20
    filled = round(max(0.0, min(1.0, load)) * width)
    bar = "█" * filled + "░" * (width - filled)
    parts = [f"load {bar} {load:.0%}"]
    if busy is not None and total is not None:
        parts[0] += f" ({busy}/{total} busy)"
    if cpu is not None:
        parts.append(f"CPU {cpu:.0%}")
    if memory:
        parts.append(f"memory {memory}")
    line = " · ".join(parts)
    return {"text/plain": line, "text/html": f"<code>{html.escape(line)}</code>"}

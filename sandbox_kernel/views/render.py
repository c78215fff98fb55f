"""How sandbox facts look in a notebook: MIME bundles (HTML and plain text) for the magics.

Pure functions from data to ``{"text/plain": ..., "text/html": ...}``; the front-ends decide
how a bundle is shown.
"""

from __future__ import annotations

import base64
import html
import json
import re
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


#: Raster images: shown as ``<img>`` from base64, which cannot run anything.
_RASTER_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif"})
#: The only link destinations kept in Markdown from the sandbox.
_SAFE_LINK = re.compile(r"(?:https?://|mailto:)", re.IGNORECASE)
#: Where a Markdown link destination starts: an inline link or image ``](``, or a reference
#: definition ``]:``; whitespace (a line break included) may come before the destination.
_LINK_START = re.compile(r"\]([(:])\s*")
#: A bare ``ftp://`` URL, which GitHub-flavoured Markdown turns into a link by itself.
_BARE_FTP = re.compile(r"(?i)\bftp(?=://)")


def file_bundle(name: str, mime: str, data: bytes) -> Bundle:
    """A file of the sandbox, shown inline, in a shape that cannot act in the notebook page.

    The notebook page holds the user's Jupyter credentials, and anything from the sandbox is
    untrusted: raster images become base64 ``<img>`` data, SVG is sent only as
    ``image/svg+xml`` (JupyterLab shows it as an image, where scripts never run), HTML only
    inside a sandboxed frame of its own origin (:func:`isolated_html`), Markdown with its HTML
    and its unsafe links neutralized (:func:`safe_markdown`), JSON as data, the rest as text.
    """
    if mime in _RASTER_IMAGES:
        return {mime: base64.b64encode(data).decode("ascii"), "text/plain": f"<{name}>"}
    decoded = data.decode("utf-8", errors="replace")
    if mime == "image/svg+xml":
        return {mime: decoded, "text/plain": f"<{name}>"}
    if mime == "text/html":
        return isolated_html(name, decoded)
    if mime == "text/markdown":
        return {mime: safe_markdown(decoded), "text/plain": decoded}
    if mime == "application/json":
        try:
            return {mime: json.loads(decoded, parse_constant=_no_constant), "text/plain": decoded}
        except (ValueError, RecursionError):  # not JSON, NaN, nested too deep: shown as text
            return {"text/plain": decoded}
    return {"text/plain": decoded}


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def html_fallback(name: str) -> str:
    """What is seen instead of a sandbox HTML page where it cannot be shown isolated (an
    untrusted notebook, a front-end without HTML)."""
    return (
        f"[{name}: an HTML page from the sandbox. JupyterLab shows it in an isolated frame "
        "when the cell runs; in an untrusted notebook it is hidden: run the cell again to see it.]"
    )


def isolated_html(name: str, page: str) -> Bundle:
    """An HTML page of the sandbox as ``text/html`` holding only a sandboxed ``<iframe>``.

    ``sandbox="allow-scripts"`` without ``allow-same-origin`` gives the page an opaque origin
    of its own: its scripts run, but it cannot read the notebook page (``parent.document``),
    its cookies, or call the Jupyter APIs with the user's credentials; no popups, no navigation
    of the notebook tab. ``srcdoc`` is attribute-escaped, so the page cannot close the
    attribute or the frame. The fallback sentence inside the frame element is never rendered by
    a browser that shows the frame; JupyterLab's sanitizer of untrusted notebooks drops the
    frame and keeps that sentence, which is then what the user sees.
    """
    fallback = html_fallback(name)
    frame = (
        f'<iframe sandbox="allow-scripts" srcdoc="{html.escape(page, quote=True)}" '
        f'title="{html.escape(name, quote=True)}" width="100%" height="420" '
        f'style="border:1px solid #ddd;background:#fff">{html.escape(fallback)}</iframe>'
    )
    return {"text/html": frame, "text/plain": fallback}


def safe_markdown(text: str) -> str:
    """Markdown of the sandbox that can only render as text, formatting and safe links.

    ``<``, ``>`` and ``&`` are escaped, so no raw HTML, no angle-bracket autolink and no
    character reference survives. A link or image destination (inline ``](dest)`` or
    reference definition ``]: dest``) is kept only when it starts with ``http://``,
    ``https://`` or ``mailto:``; any other (``javascript:``, ``data:``, relative paths into the
    Jupyter server...) is broken with a backslash, so that it shows as the plain text it was.
    Bare ``ftp://`` URLs, which GitHub-flavoured Markdown links by itself, are broken too.
    """
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def neutralize(match: re.Match[str]) -> str:
        destination = match.string[match.end() : match.end() + 8]
        if _SAFE_LINK.match(destination):
            return match.group(0)
        return "]\\" + match.group(0)[1:]

    escaped = _LINK_START.sub(neutralize, escaped)
    return _BARE_FTP.sub(lambda match: match.group(0) + "\\", escaped)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def isolation_text(isolation: Mapping[str, Any] | None) -> str:
    if not isolation or not isinstance(isolation, Mapping):
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

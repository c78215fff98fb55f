"""How sandbox facts look in a notebook: MIME bundles (HTML and plain text) and small pictures.

Pure functions from the client's typed facts (:mod:`sandbox_kernel._generations`: ``Specs``,
``Load``, ``Inventory``) to ``{"text/plain": ..., "text/html": ...}``; the front-ends (magics,
kernel, panel) decide how a bundle is shown. Nothing here reads a server's JSON or tells one
server generation from another: a fact the server does not tell is ``None`` and gets no row,
never an "unknown" one (the embedded server has no Docker; the public one does not say how
long environments are kept).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._generations import (
    CATEGORIES,
    CATEGORY_NAMES,
    NO_LIMIT,
    Inventory,
    Isolation,
    Library,
    Load,
    Specs,
    UserLoad,
)
from .._units import format_size
from .._wire import WorkerLoad

Bundle = dict[str, Any]
UNKNOWN = "unknown"

#: How each inventory category is called on screen, by its key.
CATEGORY_LABELS: Mapping[str, str] = {key: name.many for key, name in CATEGORY_NAMES.items()}


# -- human forms -------------------------------------------------------------------------------


def human_bytes(value: object) -> str:
    """``1073741824`` -> ``1.0 GiB``; -1 means no limit; anything else unknown."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return UNKNOWN if value is None else str(value)
    if value < 0:
        return "no limit"
    return format_size(value)


#: Units of :func:`human_duration`, largest first: (singular, plural, seconds).
_DURATION_UNITS = (("day", "days", 86400), ("h", "h", 3600), ("min", "min", 60), ("s", "s", 1))


def human_duration(seconds: float) -> str:
    """A duration as people say it, in at most two units: ``"40 s"``, ``"5 min"``,
    ``"1 min 30 s"``, ``"23 h"``, ``"1 day"``, ``"2 days 3 h"`` (never ``"1 days"``).

    The second unit is dropped when it is zero, and smaller units are cut (``86399`` is
    ``"23 h 59 min"``): callers that show a countdown round first (:func:`expires_text`).
    Under ten seconds, tenths are kept (``"2.5 s"``); a negative duration is ``"0 s"``.
    """
    if not math.isfinite(seconds):
        return "forever" if seconds > 0 else "0 s"
    if seconds < 10 and not float(seconds).is_integer():
        return f"{max(seconds, 0.0):.1f}".rstrip("0").rstrip(".") + " s"
    left = max(round(seconds), 0)
    if left < 60:
        return f"{left} s"
    parts: list[str] = []
    for singular, plural, size in _DURATION_UNITS:
        count, left = divmod(left, size)
        if parts:  # the unit after the first one shown: kept only when not zero
            if count:
                parts.append(f"{count} {singular if count == 1 else plural}")
            break
        if count:
            parts.append(f"{count} {singular if count == 1 else plural}")
    return " ".join(parts)


#: ISO 8601 as sandbox servers write ``expire`` (contract): extended (3.x, with an offset;
#: 2.x, naive) or basic (``20190705T130535Z``, the 2.x README). Fractions of any length.
_ISO_MOMENT = re.compile(
    r"(\d{4})-?(\d{2})-?(\d{2})[T ](\d{2}):?(\d{2}):?(\d{2})(?:[.,](\d+))?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?",
    re.IGNORECASE,
)


def parse_moment(text: str) -> datetime.datetime | None:
    """A moment of the protocol (``expire``), timezone-aware; None when it is not ISO 8601.

    A naive time (2.x) is the server's local time: taken as this machine's, which it is for
    a local server and close enough to say "in 23 h" for a remote one.
    """
    found = _ISO_MOMENT.fullmatch(text.strip())
    if found is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in found.groups()[:6])
    fraction, offset = found.group(7) or "0", found.group(8)
    try:
        moment = datetime.datetime(year, month, day, hour, minute, second,
                                   int(fraction[:6].ljust(6, "0")))  # fmt: skip
    except ValueError:  # month 13, second 61...
        return None
    if offset is None:
        return moment.astimezone()
    if offset.upper() == "Z":
        return moment.replace(tzinfo=datetime.timezone.utc)
    digits = offset[1:].replace(":", "")
    delta = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
    sign = -1 if offset.startswith("-") else 1
    try:
        return moment.replace(tzinfo=datetime.timezone(sign * delta))
    except ValueError:  # an offset of a day or more (+99:99)
        return None


def expires_text(expire: str | None, now: datetime.datetime | None = None) -> str:
    """``expire`` of the protocol said from ``now``: ``"expires in 23 h"``, ``"expired 5 min
    ago"``. ``""`` when there is none (no environment yet, or a server that does not tell):
    the caller leaves its row out. A value that is not ISO 8601 is shown as it came."""
    if not expire:
        return ""
    moment = parse_moment(expire)
    if moment is None:
        return f"expires {expire[:80]}"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now.tzinfo is None:
        now = now.astimezone()
    left = (moment - now).total_seconds()
    # A countdown rounds to its last unit shown: 86399.6 s is "1 day", not "23 h 59 min".
    rounded = round(abs(left) / 60) * 60 if abs(left) >= 3600 else round(abs(left))
    if rounded == 0:
        return "expires now"
    return f"expires in {human_duration(rounded)}" if left > 0 else (
        f"expired {human_duration(rounded)} ago")  # fmt: skip


def _ghz(mhz: float) -> str:
    return f"{mhz / 1000:.2f} GHz" if mhz >= 1000 else f"{mhz:.0f} MHz"


def _percent(fraction: float) -> str:
    return f"{max(0.0, min(1.0, fraction)):.0%}"


# -- generic shapes ----------------------------------------------------------------------------


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


def key_values(rows: Sequence[tuple[str, object]], caption: str = "") -> Bundle:
    """Facts as a two-column table without a header row: the name, then the value (aligned
    plain text, and HTML with the names as row headers). Everything is escaped."""
    cells = [(str(name), str(value)) for name, value in rows]
    width = max((len(name) for name, _ in cells), default=0)
    lines = [caption] if caption else []
    lines += [f"{name.ljust(width)}  {value}".rstrip() for name, value in cells]
    body = "".join(
        f"<tr><th scope='row' style='text-align:left;padding-right:1.5em'>{html.escape(name)}"
        f"</th><td style='text-align:left'>{html.escape(value)}</td></tr>"
        for name, value in cells
    )
    caption_html = f"<caption style='text-align:left'>{html.escape(caption)}</caption>"
    return {
        "text/plain": "\n".join(lines),
        "text/html": f"<table>{caption_html if caption else ''}<tbody>{body}</tbody></table>",
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


# -- facts of the server -----------------------------------------------------------------------


def isolation_text(isolation: Isolation | None) -> str:
    """How commands are isolated, in one line; a loud warning when they are not."""
    if isolation is None:
        return "not told by the server"
    if isolation.isolated is False:
        return "NOT ISOLATED (commands can read and write the server's machine)"
    details = [isolation.method or ("isolated" if isolation.isolated else "not told")]
    if isolation.cgroups:
        details.append(isolation.cgroups)
    if isolation.network is False:
        details.append("no network")
    return ", ".join(details)


def specifications(url: str, specs: Specs) -> Bundle:
    """``%sandbox_specs`` and the panel's Specifications: one row per fact the server tells.

    Per run (what one cell may use), then the host; limits of ``NO_LIMIT`` say "no limit".
    """
    limits, host = specs.limits, specs.host
    rows: list[tuple[str, str | None]] = [
        ("URL", url),
        ("sandbox version", specs.sandbox_version),
        ("isolation", isolation_text(specs.isolation) if specs.isolation else None),
        ("time per run", _maybe(human_duration, specs.execute_timeout)),
        ("environments kept for", _maybe(human_duration, specs.expiration)),
        ("runs at once", _maybe(str, specs.containers)),
        ("memory per run", _memory(limits.ram, limits.swap)),
        ("storage per run", _maybe(human_bytes, limits.storage)),
        ("processes per run", _maybe(_limit, limits.processes)),
        ("CPUs per run", _cpus(limits.cpus, limits.cpu_name)),
        ("CPU time per process", _maybe(human_duration, limits.cpu_seconds)),
    ]
    if host is not None:
        rows += [
            ("CPU (host)", _host_cpu(host.cores, host.threads, host.max_mhz)),
            ("RAM (host)", _maybe(human_bytes, host.ram)),
            ("disk (host)", ", ".join(f"{d}: {human_bytes(s)}" for d, s in host.disks.items())),
        ]
    rows.append(("Docker version", specs.docker_version))
    if specs.environ:
        variables = " ".join(f"{name}={value}" for name, value in specs.environ.items())
        rows.append(("variables of every run", variables))
    told = [(name, value) for name, value in rows if value]
    return key_values(told, caption="Sandbox specifications")


def _maybe(show: Callable[[Any], str], value: object) -> str | None:
    return None if value is None else show(value)


def _limit(value: int) -> str:
    return "no limit" if value == NO_LIMIT or value < 0 else str(value)


def _memory(ram: int | None, swap: int | None) -> str | None:
    if ram is None:
        return None
    if ram == NO_LIMIT:
        return "no limit"
    if swap is None:
        return human_bytes(ram)
    if swap == 0:
        return f"{human_bytes(ram)}, no swap"
    if swap == NO_LIMIT:
        return f"{human_bytes(ram)}, swap not limited"
    return f"{human_bytes(ram)} + {human_bytes(swap)} swap"


def _cpus(count: int | None, name: str | None) -> str | None:
    if count is None:
        return name
    shown = "no limit" if count < 0 else str(count)
    return f"{shown} ({name})" if name else shown


def _host_cpu(cores: int | None, threads: int | None, max_mhz: float | None) -> str | None:
    parts = []
    if cores is not None:
        parts.append(f"{cores} core{'s' if cores != 1 else ''}")
    if threads is not None and threads != cores:
        parts.append(f"{threads} threads")
    text = " / ".join(parts)
    if max_mhz:
        text += f"{', ' if text else ''}up to {_ghz(max_mhz)}"
    return text or None


# -- the inventory -----------------------------------------------------------------------------


def libraries(rows: Sequence[Library], total: int, shown_limit: int) -> Bundle:
    """``%sandbox_libraries`` and the panel's search: the first rows of ``total`` matches. A
    version the server does not tell is left empty."""
    caption = f"{total} match{'es' if total != 1 else ''}"
    if total > len(rows):
        caption += f" (first {shown_limit} shown: narrow the pattern)"
    cells = [(CATEGORY_LABELS.get(r.category, r.category), r.name, r.version or "") for r in rows]
    return table(["category", "name", "version"], cells, caption=caption)


def inventory_summary(inventory: Inventory) -> Bundle:
    """What the sandbox has installed, at a glance: the main tools with their versions, and
    how many entries each category holds. The Libraries tab starts on it."""
    counts = inventory.counts()
    total = sum(counts.values())
    tools = [(name, version) for name, version in inventory.tools.items() if version]
    parts = []
    if tools:
        parts.append(table(["tool", "version"], tools, caption="Main tools"))
    categories = [(CATEGORY_LABELS.get(name, name), counts.get(name, 0)) for name in CATEGORIES]
    parts.append(table(["category", "entries"], categories, caption=f"{total} entries installed"))
    hint = "Type a name (or a glob such as py*) to search them all, or choose a category."
    return {
        "text/plain": "\n\n".join([*(part["text/plain"] for part in parts), hint]),
        "text/html": "<div style='display:flex;gap:2em;align-items:flex-start'>"
        + "".join(part["text/html"] for part in parts)
        + f"</div><p style='opacity:0.75'>{html.escape(hint)}</p>",
    }


# -- the load ----------------------------------------------------------------------------------


def load_figures(load: Load) -> str:
    """``"25% (10/40 busy) · CPU 8% · memory 1.2 GiB / 24 GiB"``: what the server told of the
    load, nothing for what it did not. From a sandbox that knows its users, the caller's share
    first: ``"you: 1 running · class: 17/40 busy · CPU 8% ..."``."""
    parts = []
    fraction = load.fraction
    busy = f"{load.busy}/{load.total} busy" if load.total else f"{load.busy} busy"
    if load.user is not None:
        parts += _share_figures(load.user, busy if load.busy is not None else None)
    elif fraction is not None:
        parts.append(f"{_percent(fraction)} ({busy})")
    elif load.busy is not None:
        parts.append(busy)
    if load.cpu is not None:
        parts.append(f"CPU {_percent(load.cpu)}")
    if load.memory_used is not None and load.memory_total:
        parts.append(f"memory {human_bytes(load.memory_used)} / {human_bytes(load.memory_total)}")
    elif load.memory_used is not None:
        parts.append(f"memory {human_bytes(load.memory_used)} used")
    if load.user is not None and load.user.stored_bytes:
        parts.append(f"your saved environments {human_bytes(load.user.stored_bytes)}")
    return " · ".join(parts) or "the server tells no load"


def _share_figures(user: UserLoad, busy: str | None) -> list[str]:
    """``["you: 1 running", "class: 17/40 busy"]``: the caller's runs (those waiting for
    their share too, when any), then the whole sandbox's."""
    runs = [f"{user.running} running"] if user.running is not None else []
    if user.queued:
        runs.append(f"{user.queued} queued")
    parts = [f"you: {', '.join(runs)}"] if runs else []
    if busy is not None:
        parts.append(f"class: {busy}")
    return parts


#: Users listed at most in a teacher's table (the total counts them all).
USER_ROWS = 200


def users_table(users: Sequence[UserLoad]) -> Bundle:
    """Every user's share of the sandbox, for a teacher (``usages/``' ``users``): name,
    running and queued runs, bytes of saved environments, by name, then the total."""
    ordered = sorted(users, key=lambda user: (user.name or "").lower())
    rows: list[list[object]] = [
        [_shown_name(u.name), _count(u.running), _count(u.queued), human_bytes(u.stored_bytes)]
        for u in ordered[:USER_ROWS]
    ]
    if len(ordered) > USER_ROWS:
        rows.append([f"… {len(ordered) - USER_ROWS} more", "", "", ""])
    running = sum(u.running or 0 for u in users)
    queued = sum(u.queued or 0 for u in users)
    stored = sum(u.stored_bytes or 0 for u in users)
    count = f"{len(users)} user{'s' if len(users) != 1 else ''}"
    rows.append([f"total ({count})", running, queued, human_bytes(stored)])
    caption = f"Users of the sandbox: {count}, {running} running, {queued} queued"
    return table(["user", "running", "queued", "saved environments"], rows, caption)


def _shown_name(name: str | None) -> str:
    """A user's name as the server sent it, on one line: control characters become ``?``
    and a very long name is cut (the server's text, shown to a teacher)."""
    if name is None:
        return "(no name)"
    printable = "".join(char if char.isprintable() else "?" for char in name)
    return printable if len(printable) <= 64 else printable[:63] + "…"


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


#: Workers listed at most in a cluster's load table (the total counts them all).
WORKER_ROWS = 50


def workers_table(workers: Sequence[WorkerLoad]) -> Bundle:
    """A sandbox cluster's load, worker by worker (its front's ``usages/``): name, busy/slots,
    cached environments, then the total of all of them: the class's load at a glance."""
    busy, slots = sum(w.busy for w in workers), sum(w.slots for w in workers)
    cached = sum(w.cached_environments for w in workers)
    rows: list[list[object]] = [
        [w.name, f"{w.busy}/{w.slots}", w.cached_environments] for w in workers[:WORKER_ROWS]
    ]
    if len(workers) > WORKER_ROWS:
        rows.append([f"… {len(workers) - WORKER_ROWS} more", "", ""])
    count = f"{len(workers)} worker{'s' if len(workers) != 1 else ''}"
    rows.append([f"total ({count})", f"{busy}/{slots}", cached])
    caption = f"Sandbox cluster: {count}, {busy}/{slots} slots busy"
    return table(["worker", "busy/slots", "cached environments"], rows, caption)


def usage_line(load: Load) -> Bundle:
    """``%sandbox_usage``: ``"load ███░░ 25% (10/40 busy) · CPU 8% · memory ..."``."""
    line = load_figures(load)
    fraction = load.fraction
    if fraction is not None:
        width = 20
        filled = round(fraction * width)
        bar = f"load {'█' * filled}{'░' * (width - filled)}"
        # With the caller's share, the busy figure is the class's: the bar gets the percent.
        line = f"{bar} {_percent(fraction)} · {line}" if load.user else f"{bar} {line}"
    return {"text/plain": line, "text/html": f"<code>{html.escape(line)}</code>"}


#: Tick spacings of the chart's time axis, in seconds.
_TICK_STEPS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


def load_chart(
    history: Sequence[Load], now: float | None = None, width: int = 560, height: int = 170
) -> str:
    """The load history as an SVG chart: busy/total containers (filled) and the host's CPU
    (dashed, when told) against time, a 0-100% scale, a time axis ending at "now", and the
    latest busy/total figure. The span grows with the history, from one minute.

    Everything in it is numbers and fixed words: no text from the server gets in.
    """
    now = now if now is not None else (history[-1].at if history else 0.0)
    oldest = history[0].at if history else now
    span = max(60.0, now - oldest)
    left, right, top, bottom = 44, 12, 26, 24
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(at: float) -> float:
        return left + plot_w * (1 - (now - at) / span)

    def y(fraction: float) -> float:
        return top + plot_h * (1 - max(0.0, min(1.0, fraction)))

    ink, faint = "var(--jp-ui-font-color1, #222)", "var(--jp-border-color2, #ddd)"
    muted = "var(--jp-ui-font-color2, #666)"
    # As wide as the panel, up to 1.5 times its drawn size (a projector); text scales with it.
    widest = round(1.5 * width)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='100%' viewBox='0 0 {width} {height}' "
           f"role='img' style='max-width:{widest}px;font:11px sans-serif'>"]  # fmt: skip
    latest = history[-1] if history else None
    summary = load_figures(latest) if latest else "no sample yet"
    out.append(f"<title>{html.escape(f'Load over the last {human_duration(span)}: {summary}')}"
               "</title>")  # fmt: skip
    for percent in (0, 25, 50, 75, 100):
        level = y(percent / 100)
        out.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{level:.1f}' y2='{level:.1f}' "
                   f"stroke='{faint}' stroke-width='1'/>")  # fmt: skip
        out.append(f"<text x='{left - 6}' y='{level + 4:.1f}' text-anchor='end' "
                   f"fill='{muted}'>{percent}%</text>")  # fmt: skip
    step = next((s for s in _TICK_STEPS if span / s <= 6), _TICK_STEPS[-1])
    for back in range(0, int(span) + 1, step):
        at = x(now - back)
        label = "now" if back == 0 else f"−{human_duration(back)}"
        anchor = "end" if back == 0 else "start" if at - left < 24 else "middle"
        out.append(f"<line x1='{at:.1f}' x2='{at:.1f}' y1='{top + plot_h}' "
                   f"y2='{top + plot_h + 4}' stroke='{muted}'/>")  # fmt: skip
        out.append(f"<text x='{at:.1f}' y='{height - 6}' text-anchor='{anchor}' "
                   f"fill='{muted}'>{label}</text>")  # fmt: skip
    loads = [(sample.at, sample.fraction) for sample in history if sample.fraction is not None]
    cpus = [(sample.at, sample.cpu) for sample in history if sample.cpu is not None]
    if loads:
        line = " ".join(f"{x(at):.1f},{y(value):.1f}" for at, value in loads)
        base = f"{x(loads[-1][0]):.1f},{y(0):.1f} {x(loads[0][0]):.1f},{y(0):.1f}"
        out.append(f"<polygon points='{line} {base}' fill='#1976d2' fill-opacity='0.18'/>")
        out.append(f"<polyline points='{line}' fill='none' stroke='#1976d2' stroke-width='2'/>")
    if cpus:
        line = " ".join(f"{x(at):.1f},{y(value):.1f}" for at, value in cpus)
        out.append(f"<polyline points='{line}' fill='none' stroke='#e07b00' "
                   "stroke-width='1.5' stroke-dasharray='4 3'/>")  # fmt: skip
    out.append(f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' "
               f"stroke='{muted}' stroke-width='1'/>")  # fmt: skip
    legend = "<tspan fill='#1976d2'>■</tspan> containers busy"
    if cpus:
        legend += "<tspan dx='14' fill='#e07b00'>┅</tspan> host CPU"
    out.append(f"<text x='{left}' y='14' fill='{ink}'>{legend}</text>")
    if latest is not None and latest.busy is not None:
        figure = f"{latest.busy}/{latest.total} busy" if latest.total else f"{latest.busy} busy"
        out.append(f"<text x='{left + plot_w}' y='14' text-anchor='end' fill='{ink}' "
                   f"style='font-weight:bold;font-size:13px'>{figure}</text>")  # fmt: skip
    out.append("</svg>")
    return "".join(out)

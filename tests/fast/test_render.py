"""The pure helpers of ``views/render.py``: sizes, durations and expiry in human form; the
server's typed facts as tables with no row for what a server does not tell (the contract's
2.x and 3.x fixtures, and the embedded server's); the load as a line and as a chart; and files
of the sandbox made safe to show in the notebook page (the page holds the user's Jupyter
credentials; whatever the sandbox sends is untrusted)."""

from __future__ import annotations

import base64
import datetime
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel._generations import (
    CATEGORIES,
    Isolation,
    Library,
    Load,
    read_inventory,
    read_specs,
)
from sandbox_kernel.views import render
from sandbox_kernel.views.render import file_bundle, human_bytes, isolated_html, safe_markdown

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
UTC = datetime.timezone.utc


def body(generation: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / generation / name).read_text())["body"]
    return data


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**3, "1.0 GiB"),
        (5 * 1024**5, "5120.0 TiB"),
        (2.5 * 1024**2, "2.5 MiB"),
        (-1, "no limit"),
    ],
)
def test_human_bytes(value: float, shown: str) -> None:
    assert human_bytes(value) == shown


def test_human_bytes_of_what_is_not_a_size() -> None:
    assert human_bytes(None) == "unknown"
    assert human_bytes(True) == "True", "a boolean is not a size"
    assert human_bytes("12") == "12"


# -- HTML pages: only in a frame of their own ---------------------------------------------------


class Elements(HTMLParser):
    """The start tags of an HTML fragment, with their attributes (entities decoded)."""

    def __init__(self, fragment: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(fragment)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


@pytest.mark.parametrize(
    "page",
    [
        "<h1>plain</h1>",
        '"></iframe><script>parent.document.title="owned"</script>',
        "'><img src=x onerror=alert(1)>",
        "&quot; onload=&quot;alert(1)",
        "<script>fetch('/api/contents')</script>",
    ],
)
def test_a_page_is_shown_only_inside_a_sandboxed_frame(page: str) -> None:
    bundle = isolated_html("report.html", page)
    [(tag, attributes)] = Elements(bundle["text/html"]).tags
    assert tag == "iframe", "nothing of the page may land outside the frame"
    assert attributes["sandbox"] == "allow-scripts", "no allow-same-origin, no popups"
    assert attributes["srcdoc"] == page, "the frame shows the page exactly"
    assert attributes["title"] == "report.html"
    assert "report.html" in bundle["text/plain"]


def test_a_hostile_file_name_stays_in_its_attribute() -> None:
    name = '"><script>alert(1)</script>.html'
    [(tag, attributes)] = Elements(isolated_html(name, "<p>")["text/html"]).tags
    assert (tag, attributes["title"]) == ("iframe", name)


# -- Markdown: text, formatting and safe links only ---------------------------------------------


@pytest.mark.parametrize(
    "markdown",
    [
        "[click](javascript:alert(1))",
        "[click](JavaScript:alert(1))",
        "[click](  javascript:alert(1))",
        "[click](\njavascript:alert(1))",
        "![img](data:image/svg+xml;base64,PHN2Zz4=)",
        "[api](/api/contents?token=x)",
        "[up](../../files/secret)",
        "[ref]\n\n[ref]: javascript:alert(1)",
        "[ref]\n\n[ref]:\n  vbscript:msgbox",
    ],
)
def test_unsafe_link_destinations_are_broken(markdown: str) -> None:
    shown = safe_markdown(markdown)
    assert "](" not in shown.replace("]\\(", "") and "]:" not in shown.replace("]\\:", "")


@pytest.mark.parametrize(
    "markdown",
    [
        "[site](https://example.org/x)",
        "[site](http://example.org)",
        "[mail](mailto:teacher@example.org)",
        "![plot](HTTPS://example.org/p.png)",
        "[ref]\n\n[ref]: https://example.org",
    ],
)
def test_safe_links_are_kept(markdown: str) -> None:
    assert safe_markdown(markdown) == markdown


@pytest.mark.parametrize(
    ("markdown", "shown"),
    [
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ('<img src=x onerror="alert(1)">', '&lt;img src=x onerror="alert(1)"&gt;'),
        ("<javascript:alert(1)>", "&lt;javascript:alert(1)&gt;"),
        ("&#106;avascript", "&amp;#106;avascript"),
        ("see ftp://host/file", "see ftp\\://host/file"),
    ],
)
def test_html_autolinks_references_and_ftp_become_text(markdown: str, shown: str) -> None:
    assert safe_markdown(markdown) == shown


def test_formatting_is_kept() -> None:
    text = "# Title\n\n*emphasis* and **bold**, `code`\n\n- item\n\n| a | b |\n|---|---|\n"
    assert safe_markdown(text) == text


# -- files of the sandbox ------------------------------------------------------------------------


def test_raster_images_are_base64_data() -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    for mime in ("image/png", "image/jpeg", "image/gif"):
        bundle = file_bundle("plot", mime, data)
        assert set(bundle) == {mime, "text/plain"}
        assert base64.b64decode(bundle[mime]) == data


def test_svg_is_only_an_image_never_html() -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    bundle = file_bundle("p.svg", "image/svg+xml", svg.encode())
    assert bundle == {"image/svg+xml": svg, "text/plain": "<p.svg>"}


def test_html_and_markdown_files_are_made_safe() -> None:
    page = file_bundle("page.html", "text/html", b"<script>x</script>")
    assert page == isolated_html("page.html", "<script>x</script>")
    notes = file_bundle("notes.md", "text/markdown", b"[x](javascript:y) <b>")
    assert notes["text/markdown"] == safe_markdown("[x](javascript:y) <b>")
    assert notes["text/plain"] == "[x](javascript:y) <b>"
    assert "text/html" not in notes


def test_json_is_data_when_it_is_json() -> None:
    good = file_bundle("d.json", "application/json", b'{"a": [1, 2]}')
    assert good["application/json"] == {"a": [1, 2]}
    for body in (b"{not json", b'{"a": NaN}', b"[" * 100_000):
        shown = file_bundle("d.json", "application/json", body)
        assert shown == {"text/plain": body.decode()}, "shown as the text it is"


def test_anything_else_is_text_even_when_not_utf8() -> None:
    assert file_bundle("a.txt", "text/plain", b"caf\xc3\xa9\n") == {"text/plain": "café\n"}
    assert (
        file_bundle("b.bin", "application/octet-stream", b"\xff\xfe")["text/plain"] == "\ufffd" * 2
    )
    assert file_bundle("c", "text/x-unknown", b"<b>") == {"text/plain": "<b>"}


# -- durations and expiry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0 s"),
        (2.5, "2.5 s"),
        (10.0, "10 s"),
        (40, "40 s"),
        (59.6, "1 min"),
        (60, "1 min"),
        (90, "1 min 30 s"),
        (300, "5 min"),
        (3600, "1 h"),
        (5400, "1 h 30 min"),
        (82800, "23 h"),
        (86399, "23 h 59 min"),
        (86400, "1 day"),
        (90000, "1 day 1 h"),
        (172800, "2 days"),
        (-5, "0 s"),
    ],
)
def test_human_duration(seconds: float, shown: str) -> None:
    assert render.human_duration(seconds) == shown


NOW = datetime.datetime(2019, 7, 5, 14, 5, 35, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expire", "shown"),
    [
        ("2019-07-06T14:05:35.127351+00:00", "expires in 1 day"),  # 3.x, just saved
        ("2019-07-06T13:05:35.127351+00:00", "expires in 23 h"),
        ("2019-07-06T15:05:35+02:00", "expires in 23 h"),  # another offset
        ("2019-07-05T14:10:35Z", "expires in 5 min"),
        ("20190705T140615Z", "expires in 40 s"),  # the 2.x README's basic form
        ("2019-07-05T14:00:35.5+00:00", "expired 5 min ago"),
        ("2019-07-05T14:05:35+00:00", "expires now"),
        (None, ""),
        ("", ""),
        ("next tuesday", "expires next tuesday"),  # shown as it came, never an error
        ("2019-13-45T99:00:00", "expires 2019-13-45T99:00:00"),
    ],
)
def test_expires_text(expire: str | None, shown: str) -> None:
    assert render.expires_text(expire, now=NOW) == shown


def test_a_naive_expiry_is_local_time() -> None:
    """2.x writes the server's local time without an offset: read as this machine's."""
    local = (NOW + datetime.timedelta(hours=3)).astimezone().replace(tzinfo=None)
    assert render.expires_text(local.isoformat(), now=NOW) == "expires in 3 h"


# -- specifications: a row for each fact told, none for the others ---------------------------------


def rows_of(bundle: dict[str, str]) -> dict[str, str]:
    lines = bundle["text/plain"].splitlines()[1:]  # after the caption
    found = {}
    for line in lines:
        name, value = re.split(r"\s{2,}", line, maxsplit=1)
        found[name] = value
    return found


def test_specifications_of_the_embedded_server() -> None:
    specs = read_specs(body("v3", "specifications_embedded.json"))
    rows = rows_of(render.specifications("http://127.0.0.1:7000/", specs))
    assert rows == {
        "URL": "http://127.0.0.1:7000/",
        "sandbox version": "3.0.3+sandbox-kernel.0.1.0",
        "isolation": "bubblewrap, no network",
        "time per run": "10 s",
        "environments kept for": "1 day",
        "runs at once": "4",
        "memory per run": "512.0 MiB, no swap",
        "storage per run": "100.0 MiB",
        "processes per run": "64",
        "CPUs per run": "8",
        "CPU time per process": "30 s",
        "CPU (host)": "4 cores / 8 threads, up to 4.20 GHz",
        "RAM (host)": "15.6 GiB",
        "disk (host)": "/dev/nvme0n1p2: 465.7 GiB",
    }  # no Docker row: it has no Docker


def test_specifications_of_the_public_3x_server() -> None:
    rows = rows_of(
        render.specifications("https://x/", read_specs(body("v3", "specifications.json")))
    )
    assert rows["Docker version"] == "28.2.2"
    assert rows["processes per run"] == "no limit" and rows["storage per run"] == "no limit"
    assert rows["CPU (host)"] == "2 cores"  # its frequency is not told: no "up to"
    for absent in ("isolation", "time per run", "environments kept for", "CPU time per process"):
        assert absent not in rows, absent


def test_specifications_of_a_2x_server() -> None:
    rows = rows_of(
        render.specifications("https://x/", read_specs(body("v2", "specifications.json")))
    )
    assert rows["memory per run"] == "100.0 MiB + 200.0 MiB swap"
    assert rows["storage per run"] == "no limit"  # "host": the host's disk
    assert rows["CPUs per run"] == "1 (Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz)"
    assert rows["variables of every run"] == "LANG=C.UTF-8"
    assert not any("(host)" in name for name in rows)


@pytest.mark.parametrize(
    "fixture",
    ["v2/specifications.json", "v3/specifications.json", "v3/specifications_embedded.json"],
)
def test_no_unknown_anywhere(fixture: str) -> None:
    generation, name = fixture.split("/")
    bundle = render.specifications("https://x/", read_specs(body(generation, name)))
    for shown in bundle.values():
        assert "unknown" not in shown and "?" not in shown and " days (" not in shown


def test_facts_are_escaped() -> None:
    bundle = render.key_values([("<b>name</b>", "<script>alert(1)</script>")], caption="<i>")
    assert "<script>" not in bundle["text/html"] and "<b>" not in bundle["text/html"]
    assert "&lt;script&gt;" in bundle["text/html"]


@pytest.mark.parametrize(
    ("isolation", "shown"),
    [
        (None, "not told by the server"),
        (Isolation(True, "bubblewrap", "cgroup v2", False), "bubblewrap, cgroup v2, no network"),
        (Isolation(True), "isolated"),
        (
            Isolation(False, "none"),
            "NOT ISOLATED (commands can read and write the server's machine)",
        ),
    ],
)
def test_isolation_text(isolation: Isolation | None, shown: str) -> None:
    assert render.isolation_text(isolation) == shown


# -- the inventory -------------------------------------------------------------------------------


def test_libraries_leave_an_untold_version_empty() -> None:
    rows = [Library("bin", "bash", None), Library("bin", "gcc", "12.2.0")]
    bundle = render.libraries(rows, total=250, shown_limit=2)
    lines = bundle["text/plain"].splitlines()
    assert lines[0] == "250 matches (first 2 shown: narrow the pattern)"
    assert lines[2] == "executables  bash" and lines[3] == "executables  gcc   12.2.0"
    assert "?" not in bundle["text/html"]
    assert render.libraries(rows[:1], 1, 100)["text/plain"].startswith("1 match\n")


@pytest.mark.parametrize("generation", ["v2", "v3"])
def test_the_inventory_at_a_glance(generation: str) -> None:
    inventory = read_inventory(body(generation, "libraries.json"))
    summary = render.inventory_summary(inventory)["text/plain"]
    for tool, version in inventory.tools.items():
        assert (f"{tool} " in summary) == bool(version), tool  # only tools with a version
    counts = inventory.counts()
    assert f"{sum(counts.values())} entries installed" in summary
    for category in CATEGORIES:
        assert re.search(
            rf"^{render.CATEGORY_LABELS[category]}\s+{counts[category]}$", summary, re.M
        )


# -- the load ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "shown"),
    [
        (
            Load(10, 40, 0.08, int(1.2 * 1024**3), 24 * 1024**3),
            "load █████░░░░░░░░░░░░░░░ 25% (10/40 busy) · CPU 8% · memory 1.2 GiB / 24.0 GiB",
        ),
        (Load(2, 5), "load ████████░░░░░░░░░░░░ 40% (2/5 busy)"),  # 2.x: no CPU, no memory
        (Load(busy=3), "3 busy"),
        (Load(cpu=0.5, memory_used=1024**3), "CPU 50% · memory 1.0 GiB used"),
        (Load(), "the server tells no load"),
    ],
)
def test_usage_line(load: Load, shown: str) -> None:
    bundle = render.usage_line(load)
    assert bundle["text/plain"] == shown
    assert bundle["text/html"] == f"<code>{shown}</code>"


def history(*loads: tuple[float, int]) -> list[Load]:
    return [Load(busy, 4, cpu=0.5, at=at) for at, busy in loads]


def test_the_load_chart_has_a_scale_a_time_axis_and_the_figure() -> None:
    svg = render.load_chart(history((1000, 0), (1030, 1), (1060, 2), (1090, 1)))
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert [label for label in labels if label.endswith("%")] == ["0%", "25%", "50%", "75%", "100%"]
    assert labels[-1] == "1/4 busy"
    assert "now" in labels and "−1 min 30 s" in labels  # the span of the history, 90 s
    assert re.search(r"<title>Load over the last 1 min 30 s: 25% \(1/4 busy\) · CPU 50%", svg)
    assert svg.count("<polyline") == 2  # the load, the host's CPU


def test_the_load_chart_grows_from_one_minute_to_the_window() -> None:
    short = re.findall(r">(−[^<]*)<", render.load_chart(history((0, 0), (5, 1))))
    assert short[-1] == "−1 min" and len(short) <= 6
    long = re.findall(r">(−[^<]*)<", render.load_chart(history((0, 0), (300, 1))))
    assert long[-1] == "−5 min" and len(long) <= 6
    assert "no sample yet" in render.load_chart([], now=0)


def test_the_load_chart_plots_fractions_inside_its_frame() -> None:
    svg = render.load_chart(history((0, 0), (30, 4), (60, 2)), width=520, height=170)
    line = re.search(r"<polyline points='([^']+)'", svg)
    assert line is not None
    ys = [float(point.split(",")[1]) for point in line.group(1).split()]
    top, bottom = 26, 170 - 24
    assert ys == [bottom, top, (top + bottom) / 2]  # 0 %, 100 %, 50 %

"""Nothing from the sandbox or a server becomes active content in the notebook page.

The notebook page holds the user's Jupyter credentials: a script running there can drive the
contents and terminals APIs, that is, the host. What the kernel sends for ``display FILE`` is
checked in two ways:

- through jupyter_client (no browser), the MIME bundles themselves: HTML only as a sandboxed
  ``<iframe srcdoc>`` holding exactly the file, SVG only as ``image/svg+xml``, Markdown with its
  HTML escaped and only http, https and mailto links, whatever the file names, and whatever a
  program of the cell does to fake a display; strings of a hostile server (specifications,
  library names, errors) only as text in the magics' and the panel's HTML;
- in a real JupyterLab driven by Chromium: the displayed page's scripts run (a marker in its
  own document), but ``parent.document``, ``document.cookie`` and
  ``fetch('/api/contents', {credentials: 'include'})`` all fail, nothing reaches the notebook
  page, and an untrusted copy of the notebook shows the fallback sentence instead.
"""

from __future__ import annotations

import base64
import html
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .. import test_panel_browser as browser_harness
from ..conftest import KernelSession
from ..helpers import kernel_env
from ..test_panel_browser import (
    Lab,
    notebook_panel,
    open_notebook,
    run_all,
    screenshot,
    write_notebook,
)
from .conftest import Hostile

#: JupyterLab on the session's server, and Chromium: the browser tests' fixtures.
lab = browser_harness.lab
browser = browser_harness.browser
new_page = browser_harness.new_page

FIXTURES = Path(__file__).parent.parent / "fixtures"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

#: The MIME types a displayed file may come as.
ALLOWED_TYPES = {
    "text/plain",
    "text/html",
    "text/markdown",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/svg+xml",
    "application/json",
}
#: The only HTML a displayed file may become: one sandboxed frame (scripts, no same origin, no
#: popups, no top navigation) whose attributes cannot be closed early, with text inside.
FRAME = re.compile(
    r'<iframe sandbox="allow-scripts" srcdoc="(?P<srcdoc>[^"<>]*)"'
    r'(?: (?:title|width|height|style)="[^"<>]*")*>(?P<fallback>[^<>]*)</iframe>'
)
SAFE_LINK = re.compile(r"(?:https?://|mailto:)", re.IGNORECASE)
#: Tags our own HTML (tables, lines, the panel's views) may contain; attributes: style only,
#: plus the panel's images and load plot.
OWN_TAGS = {
    "table",
    "caption",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "code",
    "b",
    "i",
    "pre",
    "div",
    "p",
    "span",
}
OWN_ATTRIBUTES = {"style"}
#: The load chart (``render.load_chart``): its tags and their attributes, all our own.
CHART_TAGS = {"svg", "title", "line", "text", "tspan", "polygon", "polyline", "rect"}
CHART_ATTRIBUTES = {
    "width", "height", "viewbox", "role", "xmlns", "fill", "fill-opacity", "stroke",
    "stroke-width", "stroke-dasharray", "points", "x", "y", "x1", "y1", "x2", "y2", "dx",
    "text-anchor",
}  # fmt: skip


# -- helpers shared with the other front-end tests ------------------------------------------------


class FolderKernel(KernelSession):
    """A Sandbox kernel started through jupyter_client in ``folder``, as Jupyter starts a
    notebook's kernel in the notebook's folder."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.folder = folder
        super().__init__(env, cwd=folder)


def fixture_body(name: str) -> Any:
    return json.loads((FIXTURES / "v3" / name).read_text())["body"]


class FakeSandbox:
    """A little HTTP server on 127.0.0.1 answering like a sandbox server with what the test
    sets (``answer``), recording every request as it came (``requests``: method, path, headers,
    and the raw request head). It stands for a hostile or broken server that the embedded one
    cannot be made to be."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.answer("specifications/", fixture_body("specifications.json"))
        self.answer("usages/", fixture_body("usages.json"))
        self.answer("libraries/", fixture_body("libraries.json"))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0].lstrip("/")
                with fake._lock:
                    fake.requests.append(
                        {
                            "method": self.command,
                            "path": path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "raw": f"{self.requestline}\r\n{self.headers}".encode() + body,
                        }
                    )
                    status, content_type, data = fake.answers.get(
                        path, (404, "text/plain", b"not found")
                    )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answer(
        self, path: str, body: Any, status: int = 200, content_type: str = "application/json"
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self._lock:
            self.answers[path] = (status, content_type, data)

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for request in self.requests if request["path"] == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeSandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- what a displayed file may look like ------------------------------------------------------


class _Tags(HTMLParser):
    """Every start tag of an HTML text, with its attributes, as a browser would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags_of(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(text)
    parser.close()
    return parser.tags


def markdown_links(markdown: str) -> tuple[list[str], list[str]]:
    """(link and image URLs, tags) of ``markdown`` rendered by mistune, URLs passed as they are
    (a second Markdown implementation; the browser test checks JupyterLab's own)."""
    try:
        import mistune
    except ImportError:
        pytest.fail("mistune is missing (it comes with nbconvert): pip install mistune", False)
    renderer = mistune.HTMLRenderer(escape=False, allow_harmful_protocols=True)
    rendered = str(mistune.create_markdown(renderer=renderer)(markdown))
    tags = tags_of(rendered)
    urls = [str(a.get("href") or a.get("src") or "") for tag, a in tags if tag in ("a", "img")]
    return urls, [tag for tag, _ in tags]


def shape_problems(data: dict[str, Any], content: str | None = None) -> list[str]:
    """What is wrong with a displayed file's bundle: an unexpected type, HTML other than the
    sandboxed frame (holding exactly ``content`` when given), SVG as HTML, Markdown with HTML
    or with links that are not http, https or mailto."""
    problems = [f"unexpected type {mime}" for mime in data if mime not in ALLOWED_TYPES]
    if "text/plain" not in data:
        problems.append("no text/plain fallback")
    page = data.get("text/html")
    if page is not None:
        frame = FRAME.fullmatch(page)
        if frame is None:
            problems.append(f"text/html is not only a sandboxed frame: {page[:300]!r}")
        elif content is not None and html.unescape(frame["srcdoc"]) != content:
            problems.append("the frame does not hold exactly the file")
    if "image/svg+xml" in data and page is not None:
        problems.append("SVG also sent as HTML")
    markdown = data.get("text/markdown")
    if markdown is not None:
        if "<" in markdown or ">" in markdown:
            problems.append(f"Markdown with < or >: {markdown[:300]!r}")
        urls, tags = markdown_links(markdown)
        problems += [f"Markdown link kept: {url!r}" for url in urls if not SAFE_LINK.match(url)]
        problems += [f"Markdown made a <{tag}>" for tag in tags if tag in ("script", "iframe")]
    return problems


def displays(cell: Any) -> list[dict[str, Any]]:
    return [message["data"] for message in cell.of_type("display_data")]


def put_file(name: str, content: str) -> str:
    """Bash writing ``content`` to ``name`` exactly (base64: no quoting to get wrong)."""
    encoded = base64.b64encode(content.encode()).decode()
    return f"printf %s {encoded} | base64 -d > {_quote(name)}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- through jupyter_client ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(
    hostile: Hostile, kernelspec: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FolderKernel]:
    folder = tmp_path_factory.mktemp("page-notebook")
    server = hostile.server
    session = FolderKernel(kernel_env(server.url, server.token), folder)
    yield session
    session.stop()


Trial = Callable[[Callable[[str], None]], None]

PAGE = """<!doctype html><title>report</title>
<p id="x">it's "quoted" &amp; <b>bold</b></p>
<script>document.title = "</iframe><script>top.PWNED = 1</" + "script>";</script>
<iframe srcdoc="&lt;script&gt;top.PWNED=2&lt;/script&gt;"></iframe>
"""


@pytest.mark.parametrize(
    "name",
    [
        "report.html",
        "page.htm",
        "UPPER.HTML",
        '"><img src=x onerror="top.PWNED=3">.html',
        "' onload='top.PWNED=4' x='.html",
        "&quot;&lt;script&gt;.html",
        "</iframe><svg onload=top.PWNED=5>.html".replace("/", ""),
    ],
    ids=[
        "html",
        "htm",
        "upper-case",
        "name-closes-a-quote",
        "name-single-quote",
        "name-entities",
        "name-closes-the-frame",
    ],
)
def test_html_is_shown_only_in_a_sandboxed_frame(
    kernel: FolderKernel, trial: Trial, name: str
) -> None:
    def case(marker: str) -> None:
        content = PAGE + f"<!-- {marker} -->\n"
        cell = kernel.run(f"{put_file(name, content)}; display {_quote(name)}")
        assert cell.status == "ok", cell.reply
        [data] = displays(cell)
        assert shape_problems(data, content) == []
        assert set(data) == {"text/html", "text/plain"}
        assert name in data["text/plain"], "the fallback does not name the file"
        fallback = FRAME.fullmatch(data["text/html"])
        assert fallback is not None and name in html.unescape(fallback["fallback"])

    trial(case)


SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20" onload="top.PWNED=6">
<script>top.PWNED = 7</script><rect width="40" height="20" fill="teal"/>
<foreignObject><iframe xmlns="http://www.w3.org/1999/xhtml" src="javascript:top.PWNED=8"/>
</foreignObject></svg>
"""


@pytest.mark.parametrize("name", ["drawing.svg", "SHOUT.SVG", "<svg onload=alert(1)>.svg"])
def test_svg_is_sent_only_as_an_image(kernel: FolderKernel, trial: Trial, name: str) -> None:
    def case(marker: str) -> None:
        cell = kernel.run(f"{put_file(name, SVG)}; display {_quote(name)}")
        assert cell.status == "ok", cell.reply
        [data] = displays(cell)
        assert shape_problems(data) == []
        assert set(data) == {"image/svg+xml", "text/plain"}
        assert data["image/svg+xml"] == SVG

    trial(case)


MARKDOWN = """# Results <img src=x onerror="top.PWNED=9">

<script>top.PWNED = 10</script> and <b>raw</b> &amp; &#106;avascript:

[inline](javascript:top.PWNED=11) [spaced](  javascript:top.PWNED=12 )
[upper](JAVASCRIPT:top.PWNED=13) [entity](&#106;avascript:top.PWNED=14)
[angle](<javascript:top.PWNED=15>) [broken
line](
javascript:top.PWNED=16) [relative](/api/contents) [data](data:text/html,<script>x</script>)
![image](javascript:top.PWNED=17) ![svg](data:image/svg+xml;base64,PHN2Zz4=)
[reference][bad] [shortcut] [collapsed][] ![ref-image][bad]
<javascript:top.PWNED=18> <https://kept.example/auto> ftp://files.example/x

[bad]: javascript:top.PWNED=19
[shortcut]:
  /api/contents "title"
   [collapsed]: <data:text/html,x>
> [quoted]: javascript:top.PWNED=20

[good](https://example.org/ok?a=1&b=2) [mail](mailto:someone@example.org) [plain](http://x.example/)
"""


def test_markdown_is_escaped_and_keeps_only_web_links(kernel: FolderKernel, trial: Trial) -> None:
    def case(marker: str) -> None:
        cell = kernel.run(f"{put_file('notes.md', MARKDOWN)}; display notes.md")
        assert cell.status == "ok", cell.reply
        [data] = displays(cell)
        assert shape_problems(data) == []
        urls, _ = markdown_links(data["text/markdown"])
        assert "https://example.org/ok?a=1&b=2" in urls, urls  # good links survive, & and all
        assert "mailto:someone@example.org" in urls and "http://x.example/" in urls
        assert "javascript:top.PWNED=11" in data["text/markdown"]  # shown as text, not dropped

    trial(case)


def test_other_files_are_data_or_text(kernel: FolderKernel, trial: Trial) -> None:
    def case(marker: str) -> None:
        hostile_text = '<script>top.PWNED = 21</script><img src=x onerror="top.PWNED=22">'
        files = {
            "data.json": json.dumps({"html": hostile_text}),
            "broken.json": hostile_text,
            "page.txt": hostile_text,
            "page.xhtml": hostile_text,
            "page.mhtml": hostile_text,
            "no-extension": hostile_text,
        }
        writes = "; ".join(put_file(name, content) for name, content in files.items())
        cell = kernel.run(f"{writes}; display {' '.join(files)}")
        assert cell.status == "ok", cell.reply
        shown = displays(cell)
        assert len(shown) == len(files)
        for data in shown:
            assert shape_problems(data) == []
            assert set(data) <= {"text/plain", "application/json"}, data.keys()
        assert shown[0]["application/json"] == {"html": hostile_text}

    trial(case)


def test_a_program_faking_a_display_still_gets_only_isolated_shapes(
    kernel: FolderKernel, trial: Trial
) -> None:
    """A program of the cell writes into the kernel's display folder itself (directly, from
    Python, and from a background job finishing after the cell), and the cell calls
    ``display`` on a file a program wrote: whatever is shown is isolated."""

    def case(marker: str) -> None:
        evil = f"<script>top.PWNED = '{marker}'</script>"
        code = "\n".join(
            [
                put_file("evil.html", evil),
                "mkdir -p ~/.sandbox_kernel/display",
                "cp evil.html ~/.sandbox_kernel/display/0-planted.html",
                "cp evil.html ~/.sandbox_kernel/display/7-planted.html",
                "python3 -c \"import os; d=os.path.expanduser('~/.sandbox_kernel/display');"
                " open(os.path.join(d, '1-python.html'), 'w').write(open('evil.html').read())\"",
                "(sleep 0.3; cp evil.html ~/.sandbox_kernel/display/2-late.html) &",
                "display evil.html",
                "cp evil.html ~/.sandbox_kernel/display/9-after.html",
                "sleep 0.5",
            ]
        )
        cell = kernel.run(code)
        assert cell.status == "ok", cell.reply
        shown = displays(cell)
        assert shown, "the real display call showed nothing"
        for data in shown:
            assert shape_problems(data, evil) == []
        assert any("evil.html" in data["text/plain"] for data in shown)
        planted = kernel.run("cp evil.html ~/.sandbox_kernel/display/0-next.html; true")
        for data in displays(planted):
            assert shape_problems(data, evil) == []

    trial(case)


# -- strings of a hostile server ----------------------------------------------------------------

HOSTILE = '<img src=x onerror="top.PWNED=30">'


def hostile_server() -> FakeSandbox:
    """A server whose every string is markup (version, devices, libraries, executables)."""
    fake = FakeSandbox()
    specs = fixture_body("specifications.json")
    specs["host"]["sandbox_version"] = f"3.0.3{HOSTILE}"
    specs["host"]["docker_version"] = "<script>top.PWNED=31</script>"
    specs["host"]["memory"]["storage"] = {f"/dev/{HOSTILE}": 1024**3}
    specs["container"]["count"] = 4
    fake.answer("specifications/", specs)
    libraries = fixture_body("libraries.json")
    libraries["libraries"]["python"][f"evil{HOSTILE}"] = "<script>top.PWNED=32</script>"
    libraries["bin"] = [*libraries["bin"][:20], f"tool{HOSTILE}"]
    fake.answer("libraries/", libraries)
    usages = fixture_body("usages.json")
    usages["container"] = 1
    fake.answer("usages/", usages)
    fake.answer("execute/", f"<h1>{HOSTILE}</h1>".encode(), 500, "text/html")
    return fake


def own_html_problems(text: str) -> list[str]:
    """Tags or attributes in our own HTML that a server's string could have brought."""
    problems = []
    for tag, attributes in tags_of(text):
        if tag not in OWN_TAGS | CHART_TAGS | {"img"}:
            problems.append(f"<{tag}> in {text[:200]!r}")
        allowed = OWN_ATTRIBUTES | (CHART_ATTRIBUTES if tag in CHART_TAGS else set())
        if tag == "th":
            allowed = allowed | {"scope"}
        if tag == "img":
            src = attributes.get("src") or ""
            if not src.startswith("data:image/"):
                problems.append(f"<img src={src[:60]!r}>")
            allowed = {"alt", "src"}
        problems += [f"<{tag} {name}=...>" for name in attributes if name not in allowed]
    return problems


def widget_html_values(messages: list[dict[str, Any]]) -> list[str]:
    """The HTML values the kernel sent to widgets (HTML widgets render them as markup)."""
    values = []
    for message in messages:
        if message["msg_type"] in ("comm_open", "comm_msg"):
            state = message["content"]["data"].get("state", {})
            if isinstance(state.get("value"), str):
                values.append(state["value"])
    return values


def iopub(kernel: KernelSession, seconds: float) -> list[dict[str, Any]]:
    found, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            found.append(kernel.client.get_iopub_msg(timeout=0.2))
        except queue.Empty:
            continue
    return found


def test_server_strings_stay_text_in_the_magics_and_the_panel(
    kernelspec: str, tmp_path: Path
) -> None:
    with hostile_server() as fake:
        kernel = FolderKernel(kernel_env(fake.url, ""), tmp_path)
        try:
            outputs: list[dict[str, Any]] = []
            for line in (
                "%sandbox_specs",
                "%sandbox_libraries",
                "%sandbox_libraries evil",
                "%sandbox_libraries tool --category bin",
                "%sandbox_status",
                "%sandbox_usage",
                "%sandbox_help",
                "echo never runs",
                "%sandbox_panel --interval 0.5",
            ):
                cell = kernel.run(line)
                outputs += cell.outputs
            outputs += iopub(kernel, 3)
            shown = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
            markup = [data["text/html"] for data in shown if "text/html" in data]
            texts = " ".join(data.get("text/plain", "") for data in shown)
            assert "3.0.3" + HOSTILE in texts  # the server's strings are there, as text
            assert any(f"evil{HOSTILE}" in html.unescape(value) for value in markup)
            widget_values = widget_html_values(outputs)
            assert any("busy" in value for value in widget_values), "the panel never loaded"
            assert any(html.escape(HOSTILE) in value for value in widget_values)
            for value in markup + widget_values:
                assert own_html_problems(value) == [], value[:300]
        finally:
            kernel.stop()


# -- in a real JupyterLab -----------------------------------------------------------------------

PROBE_PAGE = """<!doctype html><html><body>
<div id="marker">not run</div><div id="parent">not tried</div><div id="cookie">not tried</div>
<div id="fetch">not tried</div><div id="popup">not tried</div><div id="top">not tried</div>
<script>
const say = (id, text) => { document.getElementById(id).textContent = text; };
say("marker", "scripts run");
try { say("parent", "parent READ " + parent.document.cookie); parent.PWNED = "frame"; }
catch (error) { say("parent", "parent BLOCKED " + error.name); }
try { say("cookie", "cookie READ " + document.cookie); }
catch (error) { say("cookie", "cookie BLOCKED " + error.name); }
fetch("/api/contents", {credentials: "include"})
  .then((response) => response.text().then((text) =>
      say("fetch", "fetch READ " + response.status + " " + text.slice(0, 80))))
  .catch((error) => say("fetch", "fetch BLOCKED " + error.name));
try { say("popup", window.open("about:blank") === null ? "popup BLOCKED" : "popup OPENED"); }
catch (error) { say("popup", "popup BLOCKED " + error.name); }
try { top.location.href = "about:blank#hijacked"; say("top", "top NAVIGATED"); }
catch (error) { say("top", "top BLOCKED " + error.name); }
</script></body></html>
"""

HOSTILE_CELLS = [
    f"{put_file('probe.html', PROBE_PAGE)}\ndisplay probe.html",
    f"{put_file('<img src=x onerror=top.PWNED=40>.html', '<p>named</p>')}\n"
    "display '<img src=x onerror=top.PWNED=40>.html'",
    f"{put_file('notes.md', MARKDOWN)}\ndisplay notes.md",
    f"{put_file('drawing.svg', SVG)}\ndisplay drawing.svg",
    "mkdir -p ~/.sandbox_kernel/display\n"
    f"{put_file('planted.html', '<script>top.PWNED=41</script>')}\n"
    "cp planted.html ~/.sandbox_kernel/display/0-planted.html\necho planted",
]


def _pwned(page: Any) -> Any:
    return page.evaluate("() => window.PWNED")


def test_displayed_html_runs_isolated_in_jupyterlab(lab: Lab, new_page: Callable[[], Any]) -> None:
    """The page's scripts run in a frame of their own origin: the notebook page, its cookies
    and the Jupyter API stay out of reach; no other format brings script into the page; a
    reopened, untrusted copy shows the fallback sentence instead of the frame."""
    from playwright.sync_api import expect

    write_notebook(lab, "hostile-page", HOSTILE_CELLS)
    page = open_notebook(new_page(), lab, "hostile-page")
    address = page.url
    run_all(page)
    panel = notebook_panel(page)
    frame = panel.frame_locator("iframe[sandbox]").first
    try:
        expect(frame.locator("#marker")).to_have_text("scripts run", timeout=20_000)
        expect(frame.locator("#fetch")).not_to_have_text("not tried", timeout=20_000)
    finally:
        screenshot(page, "hostile-page")
    outcomes = {
        name: frame.locator(f"#{name}").inner_text()
        for name in ("parent", "cookie", "fetch", "popup", "top")
    }
    for name, outcome in outcomes.items():
        assert "BLOCKED" in outcome, f"{name}: {outcome}"
    assert "_xsrf" in page.evaluate("() => document.cookie"), "no cookie to protect"
    assert page.url == address, "the frame navigated the notebook page"
    # The probe and the page with a hostile name; the planted file is not shown at all.
    assert panel.locator("iframe").count() == 2
    for element in panel.locator(".jp-OutputArea-output iframe").all():
        assert element.get_attribute("sandbox") == "allow-scripts"
    # Links and images of the rendered Markdown (JupyterLab's own heading anchors aside).
    links = panel.locator(
        ".jp-RenderedMarkdown a[href]:not(.jp-InternalAnchorLink), .jp-RenderedMarkdown img[src]"
    )
    urls = [link.get_attribute("href") or link.get_attribute("src") for link in links.all()]
    assert "https://example.org/ok?a=1&b=2" in urls, urls
    assert [url for url in urls if not SAFE_LINK.match(url or "")] == []
    active = panel.locator(
        ".jp-OutputArea-output script, .jp-OutputArea-output [onerror], "
        ".jp-OutputArea-output [onload], .jp-OutputArea-output svg script"
    )
    assert active.count() == 0
    time.sleep(1)
    assert _pwned(page) is None, f"script ran in the notebook page: {_pwned(page)}"

    untrusted = _untrusted_copy(lab, page, "hostile-page")
    copy = open_notebook(new_page(), lab, untrusted)
    copy_panel = notebook_panel(copy)
    try:
        fallback = copy_panel.locator(".jp-OutputArea-output", has_text="an HTML page from the")
        expect(fallback.first).to_be_visible(timeout=20_000)
        expect(copy_panel.locator(".jp-OutputArea-output", has_text="probe.html")).to_be_visible()
    finally:
        screenshot(copy, "hostile-page-untrusted")
    assert copy_panel.locator("iframe").count() == 0
    assert fallback.count() == 2
    time.sleep(1)
    assert _pwned(copy) is None


def _untrusted_copy(lab: Lab, page: Any, name: str) -> str:
    """Save the notebook from the browser, and write a copy as it would come from elsewhere:
    the same outputs, a content JupyterLab has never signed (so it is not trusted)."""
    import nbformat

    path = lab.root / f"{name}.ipynb"
    before = path.stat().st_mtime_ns
    page.locator("#jp-MainMenu .lm-MenuBar-item", has_text=re.compile(r"^File$")).click()
    menu = page.locator(".lm-Menu").last
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save( Notebook)?$"))
    menu.locator(".lm-Menu-item", has=label).first.click()
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.2)
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].outputs, "the saved notebook has no outputs"
    notebook.metadata["copied_from"] = "elsewhere"
    notebook.metadata.pop("signature", None)
    copy = f"{name}-copy"
    nbformat.write(notebook, lab.root / f"{copy}.ipynb")
    return copy

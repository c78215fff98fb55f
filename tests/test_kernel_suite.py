"""The jupyter_kernel_test suite, configured for every feature it can check, against the
embedded server."""

from __future__ import annotations

from collections.abc import Iterator

import jupyter_kernel_test as jkt
import pytest

from .conftest import Server
from .helpers import sandbox_environ


@pytest.fixture(scope="module", autouse=True)
def _sandbox(server: Server, kernelspec: str) -> Iterator[None]:
    """The suite starts its kernel in setUpClass, from this process's environment."""
    with sandbox_environ(server.url, server.token):
        yield


class TestSandboxKernel(jkt.KernelTests):
    kernel_name = "sandbox"
    language_name = "bash"
    file_extension = ".sh"

    code_hello_world = "echo 'hello, world'"
    code_stderr = "echo 'error' >&2"
    code_generate_error = "exit 3"
    code_display_data = [  # noqa: RUF012 (the suite's attribute)
        {"code": "echo '<b>bold</b>' > page.html; display page.html", "mime": "text/html"},
        {
            "code": "printf '<svg xmlns=\"http://www.w3.org/2000/svg\"/>' > p.svg; display p.svg",
            "mime": "image/svg+xml",
        },
        {"code": "printf '# Title' > notes.md; display notes.md", "mime": "text/markdown"},
        {"code": "echo '{\"a\": 1}' > data.json; display data.json", "mime": "application/json"},
    ]
    completion_samples = [  # noqa: RUF012
        {"text": "ech", "matches": {"echo"}},
        {"text": "ls && whil", "matches": {"while"}},
    ]
    complete_code_samples = ["echo hi", "if true; then echo a; fi", "f() { echo; }"]  # noqa: RUF012
    incomplete_code_samples = [  # noqa: RUF012
        "if true; then",
        "for i in 1 2; do",
        "echo 'open quote",
        "cat <<EOF\nline",
        "echo a \\",
        "f() {",
        'case "$x" in',
    ]
    invalid_code_samples = ["fi", "done", "echo )"]  # noqa: RUF012
    code_inspect_sample = "bash"
    code_history_pattern = "echo history*"
    supported_history_operations = ("tail", "range", "search")

    # Features a bash kernel does not have: no execute_result (cells print), no pager, and
    # the suite's history check is built on execute_result samples; ours follows.
    test_execute_result = None  # type: ignore[assignment]
    test_pager = None  # type: ignore[assignment]
    test_clear_output = None  # type: ignore[assignment]

    def test_history(self) -> None:  # type: ignore[override]
        codes = ["echo history 1", "echo history 2", "echo history 3"]
        reply = self.history_helper(codes, output=False, raw=True, hist_access_type="tail", n=3)
        history = reply["content"]["history"]
        self.assertEqual([entry[2] for entry in history], codes)
        session, start = history[0][:2]
        reply = self.history_helper(
            [],
            output=False,
            raw=True,
            hist_access_type="range",
            session=session,
            start=start,
            stop=start + 1,
        )
        self.assertEqual([entry[1:] for entry in reply["content"]["history"]], [[start, codes[0]]])
        reply = self.history_helper(
            codes,
            output=False,
            raw=True,
            hist_access_type="search",
            pattern=self.code_history_pattern,
            unique=True,
        )
        self.assertEqual(sorted(entry[2] for entry in reply["content"]["history"]), codes)
        reply = self.history_helper(
            [],
            output=False,
            raw=True,
            hist_access_type="search",
            pattern=self.code_history_pattern,
            n=2,
        )
        self.assertEqual(len(reply["content"]["history"]), 2)

"""Every magic and teaching cell through the Sandbox kernel (jupyter_client), against the
embedded server, bad uses included."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import KernelSession, Server
from .helpers import kernel_env
from .hostile.test_page import FolderKernel

StartKernel = Callable[..., KernelSession]


@pytest.fixture
def kernel(server: Server, kernelspec: str, tmp_path: Path) -> Iterator[KernelSession]:
    """A kernel started in a fresh temporary folder, as Jupyter starts one in the notebook's
    folder: the only local folder its magics read and write."""
    session = FolderKernel(kernel_env(server.url, server.token), tmp_path)
    try:
        session.run("%sandbox_status")  # connects
        yield session
    finally:
        session.stop()


def shown(cell: object) -> str:
    return "\n".join(d["data"]["text/plain"] for d in cell.of_type("display_data"))  # type: ignore[attr-defined]


def test_environ_wins_over_saved_state_and_unset(kernel: KernelSession) -> None:
    kernel.run("x=saved")
    cell = kernel.run("%sandbox_env x=sent OTHER=1\necho $x")
    assert cell.stdout == "sent\n"
    assert "OTHER" in shown(cell)
    assert kernel.run("echo $x $OTHER").stdout == "sent 1\n"
    assert kernel.run("%sandbox_env --unset x\necho ${x:-unset} $OTHER").stdout == "unset 1\n"
    bad = kernel.run("%sandbox_env not-a-name=1\ntouch should-not-exist")
    assert bad.reply["ename"] == "UsageError" and "NAME=VALUE" in bad.reply["evalue"]
    assert kernel.run("ls should-not-exist 2>&1 || true").stdout.endswith(
        "No such file or directory\n"
    )


def test_timeout_magic(kernel: KernelSession) -> None:
    too_long = kernel.run("%sandbox_timeout 3600")
    assert too_long.reply["ename"] == "MagicError"
    assert "execute_timeout" in too_long.reply["evalue"]
    assert "--execute-timeout" in too_long.reply["evalue"]
    assert "60 s" in shown(kernel.run("%sandbox_timeout"))
    kernel.run("%sandbox_timeout 1")
    cell = kernel.run("sleep 3")
    assert cell.reply["ename"] == "Timeout"
    assert "after 1 s (%sandbox_timeout)" in cell.reply["evalue"]
    usage = kernel.run("%sandbox_timeout soon")
    assert (
        usage.reply["ename"] == "UsageError" and "usage: %sandbox_timeout" in usage.reply["evalue"]
    )


def test_specs_libraries_usage_status_help(kernel: KernelSession) -> None:
    specs = shown(kernel.run("%sandbox_specs"))
    for row in ("isolation", "bubblewrap", "time per run", "1 min", "environments kept for"):
        assert row in specs
    assert "bubblewrap" in shown(kernel.run("%sandbox_specs --refresh"))
    libraries = kernel.run("%sandbox_libraries bash --category bin")
    assert libraries.of_type("display_data")[0]["data"]["text/html"].count("<tr>") >= 2
    assert re.search(r"^executables\s+bash$", shown(libraries), re.MULTILINE)
    assert shown(libraries).splitlines()[0].endswith("matches")
    assert re.search(
        r"^Python modules\s+json",
        shown(kernel.run("%sandbox_libraries json --category python")),
        re.MULTILINE,
    )
    bad = kernel.run("%sandbox_libraries --category fortran")
    assert bad.reply["ename"] == "UsageError" and "invalid choice" in bad.reply["evalue"]
    assert "load " in shown(kernel.run("%sandbox_usage")) and "/4 busy" in shown(
        kernel.run("%sandbox_usage")
    )
    kernel.run("touch a")
    status = shown(kernel.run("%sandbox_status"))
    assert re.search(r"^environment\s+[0-9a-f-]{36}$", status, re.MULTILINE)
    assert "isolation" in status
    help_text = shown(kernel.run("%sandbox_help"))
    for name in ("%sandbox_specs", "%sandbox_download", "%%c", "%%java", "%sandbox_use"):
        assert name in help_text
    unknown = kernel.run("%sandbox_nonsense")
    assert unknown.reply["ename"] == "UsageError" and "%sandbox_specs" in unknown.reply["evalue"]


def test_reset_and_use(kernel: KernelSession) -> None:
    kernel.run("kept=1; touch here")
    status = shown(kernel.run("%sandbox_status"))
    uuid = next(line.split()[-1] for line in status.splitlines() if line.startswith("environment"))
    reset = kernel.run("%sandbox_reset\necho ${kept:-gone}; ls")
    assert reset.stdout == "gone\n"
    assert f"%sandbox_use {uuid}" in shown(reset)
    back = kernel.run(f"%sandbox_use {uuid}\necho $kept; ls")
    assert back.stdout == "1\nhere\n"
    missing = kernel.run("%sandbox_use e8c5995b-7049-4b04-8440-5d9d914360fc")
    assert (
        missing.reply["ename"] == "MagicError" and "not on the sandbox" in missing.reply["evalue"]
    )
    assert kernel.run("%sandbox_use junk").reply["ename"] == "UsageError"


def test_download(kernel: KernelSession, tmp_path: Path) -> None:
    kernel.run("mkdir -p sub && cd sub && printf 'x' > data.txt")
    target = tmp_path / "out"
    target.mkdir()
    cell = kernel.run(f"%sandbox_download data.txt --to {target} --show")
    assert (target / "data.txt").read_text() == "x"
    assert any(d["data"].get("text/plain") == "x" for d in cell.of_type("display_data"))
    again = kernel.run(f"%sandbox_download data.txt --to {target}")
    assert again.reply["ename"] == "MagicError" and "--force" in again.reply["evalue"]
    kernel.run("printf 'y' > data.txt")
    assert kernel.run(f"%sandbox_download data.txt --to {target} --force").status == "ok"
    assert (target / "data.txt").read_text() == "y"
    whole = kernel.run(f"%sandbox_download --to {target}")
    [archive] = target.glob("*.tgz")
    with tarfile.open(archive) as opened:
        assert "sub/data.txt" in opened.getnames()
    assert whole.status == "ok"
    escape = kernel.run(f"%sandbox_download ../../../etc/passwd --to {target}")
    assert (
        escape.reply["ename"] == "UsageError"
        and "outside the environment" in escape.reply["evalue"]
    )
    (target / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
    kernel.run("echo z > link.txt")
    through_link = kernel.run(f"%sandbox_download link.txt --to {target} --force")
    assert through_link.reply["ename"] == "MagicError"
    assert not (tmp_path / "elsewhere.txt").exists()
    missing = kernel.run(f"%sandbox_download nothing.txt --to {target}")
    assert missing.reply["ename"] == "MagicError" and "404" in missing.reply["evalue"]
    no_folder = kernel.run(f"%sandbox_download data.txt --to {tmp_path / 'absent'}")
    assert (
        no_folder.reply["ename"] == "MagicError"
        and "no such local folder" in no_folder.reply["evalue"]
    )


def test_upload(kernel: KernelSession, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("local notes\n")
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.sh").write_text("echo from upload\n")
    cell = kernel.run(f"%sandbox_upload {tmp_path / 'notes.txt'} {folder}")
    assert cell.status == "ok", cell.reply
    assert kernel.run("cat notes.txt; bash project/src/main.sh").stdout == (
        "local notes\nfrom upload\n"
    )
    kernel.run(f"%sandbox_upload {tmp_path / 'notes.txt'} --as renamed.txt")
    assert kernel.run("cat renamed.txt").stdout == "local notes\n"
    missing = kernel.run(f"%sandbox_upload {tmp_path / 'absent'}")
    assert (
        missing.reply["ename"] == "MagicError" and "No such local file" in missing.reply["evalue"]
    )
    two_as = kernel.run(f"%sandbox_upload {tmp_path / 'notes.txt'} {folder} --as x")
    assert two_as.reply["ename"] == "UsageError"


def test_connect(kernel: KernelSession, start_server: Callable[..., Server]) -> None:
    other = start_server("--workers", "1")
    kernel.run("here=1")
    cell = kernel.run(f"%sandbox_connect {other.url} --token {other.token}\necho ${{here:-fresh}}")
    assert cell.stdout == "fresh\n"
    assert other.url in shown(kernel.run("%sandbox_status"))
    bad = kernel.run("%sandbox_connect http://127.0.0.1:9/")
    assert bad.reply["ename"] == "MagicError" and "127.0.0.1:9" in bad.reply["evalue"]
    assert other.url in shown(kernel.run("%sandbox_status"))  # kept


def test_percent_deeper_in_a_cell_is_bash(kernel: KernelSession) -> None:
    cell = kernel.run("cat <<'EOF'\n%sandbox_specs\n%%c\nEOF\nprintf '%s\\n' done")
    assert cell.stdout == "%sandbox_specs\n%%c\ndone\n"
    line_magic_second = kernel.run("echo first\n%sandbox_specs")
    # Not in the leading lines: refused with a clear message before anything runs (bash
    # would only say "fg: no job control").
    assert line_magic_second.status == "error"
    assert line_magic_second.reply["ename"] == "UsageError"
    assert "after bash code" in line_magic_second.reply["evalue"]
    assert line_magic_second.stdout == "" and not line_magic_second.of_type("display_data")


def test_teaching_cells(kernel: KernelSession) -> None:
    python = kernel.run(
        "%%python3 --stdin 'world' --args 'a b'\nimport sys\nprint('hello', input(), sys.argv[1:])"
    )
    assert python.stdout == "hello world ['a', 'b']\n"
    c = kernel.run(
        "%%c --stdin '3 4'\n#include <stdio.h>\nint main(void) {\n"
        '    int a, b;\n    if (scanf("%d %d", &a, &b) != 2) return 1;\n'
        '    printf("%d\\n", a + b);\n    return 0;\n}'
    )
    assert c.stdout == "7\n", c.stderr
    assert kernel.run("ls main.c main").stdout == "main\nmain.c\n"
    broken = kernel.run("%%c --file broken.c\nint main(void) {\n    return missing;\n}")
    assert broken.status == "error"
    assert "broken.c:3:" in broken.stderr  # the cell's own line 3
    assert kernel.run("ls broken 2>/dev/null; echo $?").stdout == "2\n"  # never ran
    cpp = kernel.run(
        "%%cpp --flags '-O2 -std=c++17'\n#include <iostream>\n"
        'int main() { std::cout << "cpp" << std::endl; }'
    )
    assert cpp.stdout == "cpp\n", cpp.stderr
    java = kernel.run(
        "%%java --args 'x y'\npublic class Main {\n"
        "    public static void main(String[] args) {\n"
        "        long heap = Runtime.getRuntime().maxMemory() / 1024 / 1024;\n"
        '        System.out.println("java " + args.length + " " + heap);\n'
        "    }\n}"
    )
    assert java.stdout.startswith("java 2 "), java.stderr
    assert 0 < int(java.stdout.split()[2]) <= 1024
    perl = kernel.run('%%perl\nprint "perl ", 6 * 7, "\\n";')
    assert perl.stdout == "perl 42\n"
    nested = kernel.run("%%python3 --file pkg/tool.py\nprint('nested')")
    assert nested.stdout == "nested\n"
    assert kernel.run("ls pkg").stdout == "tool.py\n"
    missing = kernel.run("%%ruby\nputs 1")
    assert missing.reply["ename"] == "MagicError" and "no ruby" in missing.reply["evalue"]
    bad = kernel.run("%%c --file ../escape.c\nint main(){}")
    assert bad.reply["ename"] == "UsageError"
    as_line = kernel.run("%c --stdin 1")
    assert as_line.reply["ename"] == "UsageError" and "cell magic" in as_line.reply["evalue"]


MALFORMED_USAGES = {
    "cpu.usage": {"cpu": {"usage": "lots"}},
    "cpu": {"cpu": "lots"},
    "container": {"container": "many"},
    "memory": {"memory": ["lots"]},
    "memory.ram": {"memory": {"ram": -5}},
}


def test_a_malformed_answer_gets_a_clear_message(kernelspec: str, tmp_path: Path) -> None:
    """A server answering ``"cpu": {"usage": "lots"}`` (and other wrong types): the magic
    names the field and the value; the kernel stays fine, and works once the answer is."""
    from .hostile.test_page import FakeSandbox, fixture_body

    with FakeSandbox() as fake:
        kernel = FolderKernel(kernel_env(fake.url, ""), tmp_path)
        try:
            good = fixture_body("usages.json")
            for field, change in MALFORMED_USAGES.items():
                fake.answer("usages/", {**good, **change})
                cell = kernel.run("%sandbox_usage")
                assert cell.status == "error" and cell.reply["ename"] == "MagicError", cell.reply
                evalue = cell.reply["evalue"]
                assert evalue.startswith("Could not read the load"), evalue
                assert f"{field} = " in evalue, evalue
                assert fake.url.rstrip("/") in evalue or "usages/" in evalue, evalue
            specs = fixture_body("specifications.json")
            fake.answer("specifications/", {**specs, "container": {"count": "forty"}})
            bad_specs = kernel.run("%sandbox_specs --refresh")
            assert bad_specs.reply["ename"] == "MagicError"
            assert "container.count = 'forty'" in bad_specs.reply["evalue"]
            fake.answer("specifications/", specs)
            fake.answer("usages/", good)
            assert "10/40 busy" in shown(kernel.run("%sandbox_specs --refresh\n%sandbox_usage"))
        finally:
            kernel.stop()

"""The demo notebooks: where they are, the work folder ``lab`` copies them into, and the copy
rules (a manifest of digests, so that a user's change is never overwritten)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from ..discovery import default_data_dir

#: The demo notebooks, in the project's ``notebooks/`` folder: the ones ``lab`` copies and
#: ``demo`` runs. Other files there (a notebook saved by an older ``lab``) are not theirs.
DEMO_NOTEBOOKS: tuple[str, ...] = (
    "1-quickstart.ipynb",
    "2-teaching.ipynb",
    "3-inspecting-a-sandbox.ipynb",
    "4-from-python.ipynb",
    "5-checking.ipynb",
)
#: Files the demo notebooks read beside them (5-checking's test tables): copied with them.
DEMO_FILES: tuple[str, ...] = ("tests/sum.yaml", "tests/sum-hidden.yaml", "tests/sum-largest.out")


def demo_notebooks_folder() -> Path | None:
    """The project's ``notebooks/`` (a clone, or an editable install of one), if present."""
    folder = Path(__file__).resolve().parents[2] / "notebooks"
    return folder if all((folder / name).is_file() for name in DEMO_NOTEBOOKS) else None


def work_folder() -> Path:
    """Where ``lab`` keeps the user's copies of the demo notebooks."""
    return default_data_dir() / "notebooks"


def manifest_path() -> Path:
    """What ``lab`` copied into :func:`work_folder` (name: SHA-256), beside that folder so
    that JupyterLab does not show it."""
    return default_data_dir() / "notebooks-copied.json"


@dataclasses.dataclass
class CopyReport:
    """What :func:`copy_notebooks` did, by notebook name."""

    copied: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)

    def lines(self, source: Path) -> list[str]:
        lines = []
        if self.copied:
            lines.append(f"copied {_count_of(self.copied)}: your copies, never overwritten "
                         "once you change them")  # fmt: skip
        if self.updated:
            lines.append(f"updated {', '.join(self.updated)} (unchanged since copied)")
        for name in self.kept:
            lines.append(f"kept your changed {name}; the current version: {source / name}")
        return lines


def _count_of(names: list[str]) -> str:
    notebooks = sum(name.endswith(".ipynb") for name in names)
    others = len(names) - notebooks
    text = "1 demo notebook" if notebooks == 1 else f"{notebooks} demo notebooks"
    return text + (f" and {others} of their files" if others else "")


def copy_notebooks(source: Path, target: Path, names: Sequence[str], manifest: Path) -> CopyReport:
    """Copy ``names`` from ``source`` into ``target``, never overwriting a user's change.

    ``manifest`` records the SHA-256 of each copy made: a copy still equal to its record is
    ours and follows a newer source; one that differs was changed by the user and stays as
    it is (reported once per version of the demo it could have had). A missing copy is made
    again: deleting a copy is how to get a fresh one."""
    copies, noted = _read_manifest(manifest)
    report = CopyReport()
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        content = (source / name).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        copy = target / name
        current = _digest_of(copy)
        if current is None:
            report.copied.append(name)
        elif current == digest:
            copies[name] = digest
            continue
        elif current == copies.get(name) and not copy.is_symlink():
            report.updated.append(name)
        else:
            if noted.get(name) != digest:
                report.kept.append(name)
                noted[name] = digest
            continue
        write_file(copy, content)
        copies[name] = digest
    data = {"copies": copies, "kept_noted": noted}
    write_file(manifest, json.dumps(data, indent=1, sort_keys=True).encode())
    return report


def _digest_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _read_manifest(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The digests of the copies made, and of the demo versions a kept copy was reported
    for. Nothing when absent or unreadable: then every existing file that differs from the
    demo counts as the user's, which errs on the safe side."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return {}, {}
    return _digests(data.get("copies")), _digests(data.get("kept_noted"))


def _digests(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(key): digest for key, digest in value.items() if isinstance(digest, str)}


def write_file(path: Path, content: bytes) -> None:
    """Write whole or not at all (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def open_folder(given: Path | None) -> tuple[Path, list[str]]:
    """The folder JupyterLab opens, and what to tell about it."""
    if given is not None:
        folder = given.expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--dir {given}: not a folder")
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        return folder, ["(created now)"] if created else []
    folder = work_folder()
    source = demo_notebooks_folder()
    if source is None:
        folder.mkdir(parents=True, exist_ok=True)
        return folder, ["no demo notebooks in this installation (a clone of the project has "
                        "them in notebooks/)"]  # fmt: skip
    names = DEMO_NOTEBOOKS + DEMO_FILES
    return folder, copy_notebooks(source, folder, names, manifest_path()).lines(source)

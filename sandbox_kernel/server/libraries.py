"""``libraries/``: what commands really find inside the sandbox, computed once, then cached.

The inventory runs *in a runner*, like any command, so it lists what a command can use, not
what the server's host happens to have outside the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..protocol import EXECUTABLES, LIBRARY_CATEGORIES
from .runners import RunnerPool

log = logging.getLogger(__name__)

_TIMEOUT = 60.0

#: One shell snippet per section of the inventory, printing "name<TAB>version" per line ("?"
#: or nothing when a version is unknown); the executables section prints names only.
_LISTERS: dict[str, str] = {
    "system": r"""dpkg-query -W -f '${Package}\t${Version}\n' 2>/dev/null
""",
    "python": r"""python3 - <<'PYTHON' 2>/dev/null
import importlib.metadata as metadata, pkgutil, sys
seen = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        seen.setdefault(name, dist.version or "?")
for module in pkgutil.iter_modules():
    if not module.name.startswith("_"):
        seen.setdefault(module.name, "?")
for name in sys.builtin_module_names:
    if not name.startswith("_"):
        seen.setdefault(name, "?")
for name, version in sorted(seen.items()):
    print(f"{name}\t{version}")
PYTHON
""",
    "perl": r"""perl -MExtUtils::Installed -e '
    my $installed = ExtUtils::Installed->new(skip_cwd => 1);
    for my $module ($installed->modules) {
        my $version = eval { $installed->version($module) } // "?";
        print "$module\t", ($version eq "" ? "?" : $version), "\n";
    }' 2>/dev/null
""",
    "c": r"""ldconfig -p 2>/dev/null |
    sed -n 's/^\t\(lib[^ ]*\)\.so\.\{0,1\}\([0-9.]*\) .*/\1\t\2/p' | sort -u
""",
    EXECUTABLES: r"""IFS=: read -r -a dirs <<< "$PATH"
for dir in "${dirs[@]}"; do
    for path in "$dir"/*; do
        [ -x "$path" ] && [ ! -d "$path" ] && printf '%s\n' "${path##*/}"
    done
done | sort -u
""",
}

#: The whole inventory, one ``#section`` header before each lister's output. A category added
#: to the protocol without a lister here fails at import, not with an empty list at run time.
INVENTORY_SCRIPT = "".join(
    f"echo '#{section}'\n{_LISTERS[section]}" for section in (*LIBRARY_CATEGORIES, EXECUTABLES)
)


def parse_inventory(text: str) -> dict[str, Any]:
    """The inventory's sections as the 3.x ``libraries/`` answer."""
    libraries: dict[str, dict[str, str]] = {category: {} for category in LIBRARY_CATEGORIES}
    executables: set[str] = set()
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line[1:].strip()
            continue
        name, _, version = line.partition("\t")
        name = name.strip()
        if not name:
            continue
        if section == EXECUTABLES:
            executables.add(name)
        elif section in libraries:
            libraries[section].setdefault(name, version.strip() or "?")
    return {"libraries": libraries, EXECUTABLES: sorted(executables)}


#: The inventory's output is kept up to this (the public server's answer is ~21 KB).
_MAX_INVENTORY = 16 * 1024**2


class LibraryCache:
    def __init__(self, pool: RunnerPool) -> None:
        self.pool = pool
        self._task: asyncio.Task[dict[str, Any]] | None = None

    async def get(self) -> dict[str, Any]:
        """The inventory; every caller waits on the same single computation."""
        if self._task is None or (self._task.done() and self._task.exception() is not None):
            self._task = asyncio.get_running_loop().create_task(self._compute())
        return await asyncio.shield(self._task)

    async def _compute(self) -> dict[str, Any]:
        runner = await self.pool.create()
        try:
            environ = self.pool.isolation.base_environ(runner.workdir)
            outcome = await runner.run(INVENTORY_SCRIPT, environ, _TIMEOUT, _MAX_INVENTORY)
        finally:
            await self.pool.discard(runner)
        if outcome.exit_code not in (0, 1) and not outcome.stdout:
            raise RuntimeError(
                f"library inventory failed: {outcome.stderr.decode(errors='replace')}"
            )
        return parse_inventory(outcome.stdout.decode("utf-8", errors="replace"))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

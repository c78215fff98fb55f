"""Sizes in words, the same for every part of the project (the server's messages, the
client's errors, the views): standard library only, so that the server may import it too."""

from __future__ import annotations


def format_size(size: float) -> str:
    """Bytes as a short human text: ``512 B``, ``1.5 MiB``, ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"

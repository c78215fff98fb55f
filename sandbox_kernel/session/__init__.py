"""The session layer: environment and shell state carried across cells, above the client and
below the front-ends (kernel, IPython magics)."""

from .session import CellError, CellOutcome, Display, Session, ShellState, mime_type

__all__ = ["CellError", "CellOutcome", "Display", "Session", "ShellState", "mime_type"]

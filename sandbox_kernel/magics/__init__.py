"""The sandbox magics, written once (operations) and adapted by both front-ends."""

from . import checking, operations, teaching  # noqa: F401  (they register the magics)
from .core import REGISTRY, Magic, MagicFailed, MagicResult, MagicUsageError, find

__all__ = ["REGISTRY", "Magic", "MagicFailed", "MagicResult", "MagicUsageError", "find"]

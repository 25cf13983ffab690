"""Rename tables: one module per model family, each a tuple of `Rule`s (data, not code)."""

from .align import ALIGN_RULES

__all__ = ["ALIGN_RULES"]

"""Structured component labels (defined with the groups the engine carries)."""

from tl_depass.engine.groups import Label

__all__ = ["Label"]

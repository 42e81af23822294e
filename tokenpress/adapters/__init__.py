"""Model adapters shipped with the core (one module per family), registered through the same hook
third parties use to add a family."""

from __future__ import annotations

from tokenpress.adapters.base import AttentionParts, ImageSpan, ModelAdapter
from tokenpress.adapters.llava import LlavaAdapter
from tokenpress.hookspecs import hookimpl


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [LlavaAdapter]


__all__ = ["AttentionParts", "ImageSpan", "LlavaAdapter", "ModelAdapter"]

"""tokenpress: stackable visual-token compression for Hugging Face vision-language models."""

from __future__ import annotations

from tokenpress.attach import Handle, Report, attached_handle, compress, find_adapter
from tokenpress.cache import CompressedCache
from tokenpress.context import DecoderContext, StageContext
from tokenpress.decisions import Keep, LayerDecision, Route
from tokenpress.errors import (
    CompressionError,
    PluginError,
    StackError,
    TokenpressError,
    UnsupportedModelError,
)
from tokenpress.hookspecs import hookimpl, hookspec
from tokenpress.method import POINTS, Method, MethodConfig, SelectingConfig
from tokenpress.registry import get_registry, list_methods, register_plugin
from tokenpress.stack import Stack, Stage, load_stack, stack_json_schema
from tokenpress.tokens import TokenState, keep_count

__version__ = "0.1.0"

__all__ = [
    "POINTS",
    "CompressedCache",
    "CompressionError",
    "DecoderContext",
    "Handle",
    "Keep",
    "LayerDecision",
    "Method",
    "MethodConfig",
    "PluginError",
    "Report",
    "Route",
    "SelectingConfig",
    "Stack",
    "StackError",
    "Stage",
    "StageContext",
    "TokenState",
    "TokenpressError",
    "UnsupportedModelError",
    "attached_handle",
    "compress",
    "find_adapter",
    "get_registry",
    "hookimpl",
    "hookspec",
    "keep_count",
    "list_methods",
    "load_stack",
    "register_plugin",
    "stack_json_schema",
]

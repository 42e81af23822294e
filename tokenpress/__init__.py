"""tokenpress: stackable visual-token compression for Hugging Face vision-language models.

The public names below are imported on first use (PEP 562), so that ``import tokenpress`` - which
pytest does for the ``tokenpress.testing`` plugin in every session - does not pull in torch and
transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tokenpress.errors import (
    CompressionError,
    InputError,
    PluginError,
    StackError,
    TokenpressError,
    UnsupportedModelError,
)
from tokenpress.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

#: Where each lazily imported public name lives.
_LAZY = {
    "Handle": "tokenpress.attach",
    "Report": "tokenpress.attach",
    "attached_handle": "tokenpress.attach",
    "compress": "tokenpress.attach",
    "find_adapter": "tokenpress.attach",
    "CompressedCache": "tokenpress.cache",
    "DecoderContext": "tokenpress.context",
    "StageContext": "tokenpress.context",
    "Keep": "tokenpress.decisions",
    "LayerDecision": "tokenpress.decisions",
    "Merge": "tokenpress.decisions",
    "Route": "tokenpress.decisions",
    "POINTS": "tokenpress.method",
    "Method": "tokenpress.method",
    "MethodConfig": "tokenpress.method",
    "Ratio": "tokenpress.method",
    "SelectingConfig": "tokenpress.method",
    "WeightedConfig": "tokenpress.method",
    "get_registry": "tokenpress.registry",
    "list_methods": "tokenpress.registry",
    "register_plugin": "tokenpress.registry",
    "Stack": "tokenpress.stack",
    "Stage": "tokenpress.stack",
    "load_stack": "tokenpress.stack",
    "stack_json_schema": "tokenpress.stack",
    "TokenState": "tokenpress.tokens",
    "keep_count": "tokenpress.tokens",
    "keep_counts_on_host": "tokenpress.tokens",
}

__all__ = [
    "CompressedCache",
    "CompressionError",
    "DecoderContext",
    "Handle",
    "InputError",
    "Keep",
    "LayerDecision",
    "Merge",
    "Method",
    "MethodConfig",
    "POINTS",
    "PluginError",
    "Ratio",
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
    "WeightedConfig",
    "attached_handle",
    "compress",
    "find_adapter",
    "get_registry",
    "hookimpl",
    "hookspec",
    "keep_count",
    "keep_counts_on_host",
    "list_methods",
    "load_stack",
    "register_plugin",
    "stack_json_schema",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenpress' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from tokenpress.attach import Handle, Report, attached_handle, compress, find_adapter
    from tokenpress.cache import CompressedCache
    from tokenpress.context import DecoderContext, StageContext
    from tokenpress.decisions import Keep, LayerDecision, Merge, Route
    from tokenpress.method import POINTS, Method, MethodConfig, Ratio, SelectingConfig, WeightedConfig
    from tokenpress.registry import get_registry, list_methods, register_plugin
    from tokenpress.stack import Stack, Stage, load_stack, stack_json_schema
    from tokenpress.tokens import TokenState, keep_count, keep_counts_on_host

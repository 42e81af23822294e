"""tokenpress: stackable visual-token compression for Hugging Face vision-language models.

The public API is this top level (what a stack user, a plugin author and a family author import), the
vocabulary layer ``tokenpress.core`` (methods, configs, token states, decisions, signals, selection and
matching, stacks, the registry, the FLOPs model, method weights) and the test kit ``tokenpress.testing``.
The rest -
``runtime`` (attaching, the compressed forward), ``families`` (model adapters), ``measure`` (eval, bench,
profiling) and ``tools`` (the command line) - is the framework's inside, reached through these names.

The public names below are imported on first use (PEP 562), so that ``import tokenpress`` - which
pytest does for the ``tokenpress.testing`` plugin in every session - does not pull in torch and
transformers until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tokenpress._moved import install as _install_moved_modules
from tokenpress.core.errors import (
    CompressionError,
    InputError,
    PluginError,
    StackError,
    TokenpressError,
    UnsupportedModelError,
)
from tokenpress.core.hookspecs import hookimpl, hookspec

__version__ = "0.2.0"

_install_moved_modules()  # the old module paths (tokenpress.attach, ...) keep working for one release

#: Where each lazily imported public name lives.
_LAZY = {
    "Handle": "tokenpress.runtime.attach",
    "Report": "tokenpress.runtime.attach",
    "attached_handle": "tokenpress.runtime.attach",
    "compress": "tokenpress.runtime.attach",
    "find_adapter": "tokenpress.runtime.attach",
    "CompressedCache": "tokenpress.runtime.cache",
    "ModelAdapter": "tokenpress.runtime.adapter",
    "ImageSpan": "tokenpress.runtime.adapter",
    "ImageLayout": "tokenpress.runtime.adapter",
    "AttentionParts": "tokenpress.runtime.adapter",
    "ProjectorMLP": "tokenpress.runtime.adapter",
    "DecoderContext": "tokenpress.runtime.context",
    "EncoderBlock": "tokenpress.runtime.context",
    "StageContext": "tokenpress.runtime.context",
    "Sequence": "tokenpress.runtime.sequence",
    "layer_query_key": "tokenpress.runtime.scorer",
    "Keep": "tokenpress.core.decisions",
    "LayerDecision": "tokenpress.core.decisions",
    "Merge": "tokenpress.core.decisions",
    "Route": "tokenpress.core.decisions",
    "POINTS": "tokenpress.core.method",
    "Method": "tokenpress.core.method",
    "MethodConfig": "tokenpress.core.method",
    "Ratio": "tokenpress.core.method",
    "SelectingConfig": "tokenpress.core.method",
    "WeightedConfig": "tokenpress.core.method",
    "scaled_layer": "tokenpress.core.method",
    "get_registry": "tokenpress.core.registry",
    "list_methods": "tokenpress.core.registry",
    "register_plugin": "tokenpress.core.registry",
    "Stack": "tokenpress.core.stack",
    "Stage": "tokenpress.core.stack",
    "load_stack": "tokenpress.core.stack",
    "stack_json_schema": "tokenpress.core.stack",
    "TokenState": "tokenpress.core.tokens",
    "keep_count": "tokenpress.core.tokens",
    "keep_counts_on_host": "tokenpress.core.tokens",
    "pack_index": "tokenpress.core.tokens",
    "host_loop_allowed": "tokenpress.core.select",
    "seeded_uniform": "tokenpress.core.select",
    "topk_mask": "tokenpress.core.select",
    "AttentionReceived": "tokenpress.core.signals",
    "ClsAttention": "tokenpress.core.signals",
    "EncoderKeys": "tokenpress.core.signals",
    "Signal": "tokenpress.core.signals",
    "ScoringInput": "tokenpress.core.flops",
    "StageShape": "tokenpress.core.flops",
    "scorer_flops": "tokenpress.core.flops",
}

__all__ = [
    "AttentionParts",
    "AttentionReceived",
    "ClsAttention",
    "CompressedCache",
    "CompressionError",
    "DecoderContext",
    "EncoderBlock",
    "EncoderKeys",
    "Handle",
    "ImageLayout",
    "ImageSpan",
    "InputError",
    "Keep",
    "LayerDecision",
    "Merge",
    "Method",
    "MethodConfig",
    "ModelAdapter",
    "POINTS",
    "ProjectorMLP",
    "PluginError",
    "Ratio",
    "Report",
    "Route",
    "ScoringInput",
    "Sequence",
    "Signal",
    "SelectingConfig",
    "Stack",
    "StackError",
    "Stage",
    "StageContext",
    "StageShape",
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
    "host_loop_allowed",
    "keep_count",
    "keep_counts_on_host",
    "layer_query_key",
    "list_methods",
    "load_stack",
    "pack_index",
    "register_plugin",
    "scaled_layer",
    "scorer_flops",
    "seeded_uniform",
    "stack_json_schema",
    "topk_mask",
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
    from tokenpress.core.decisions import Keep, LayerDecision, Merge, Route
    from tokenpress.core.flops import ScoringInput, StageShape, scorer_flops
    from tokenpress.core.method import (
        POINTS,
        Method,
        MethodConfig,
        Ratio,
        SelectingConfig,
        WeightedConfig,
        scaled_layer,
    )
    from tokenpress.core.registry import get_registry, list_methods, register_plugin
    from tokenpress.core.select import seeded_uniform, topk_mask
    from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys, Signal
    from tokenpress.core.stack import Stack, Stage, load_stack, stack_json_schema
    from tokenpress.core.tokens import TokenState, keep_count, keep_counts_on_host, pack_index
    from tokenpress.runtime.adapter import AttentionParts, ImageLayout, ImageSpan, ModelAdapter, ProjectorMLP
    from tokenpress.runtime.attach import Handle, Report, attached_handle, compress, find_adapter
    from tokenpress.runtime.cache import CompressedCache
    from tokenpress.runtime.context import DecoderContext, EncoderBlock, StageContext
    from tokenpress.runtime.scorer import layer_query_key
    from tokenpress.runtime.sequence import Sequence

"""Testing helpers for tokenpress and its plugin authors: tiny models built from configs, and the
method contract (:class:`MethodContract`). Everything is imported on first use."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    **{name: "tokenpress.testing.models" for name in (
        "Prompt", "image_features_fed", "llava_batch", "qwen_batch", "sample_prompts", "select_qwen_rows",
        "select_rows", "tiny_llava", "tiny_llava_next", "tiny_qwen2_5_vl")},
    **{name: "tokenpress.testing.contract" for name in (
        "FamilyCase", "MethodContract", "StageCall", "StageObserver", "observe", "tiny_model")},
}

__all__ = [
    "FamilyCase",
    "MethodContract",
    "Prompt",
    "StageCall",
    "StageObserver",
    "image_features_fed",
    "llava_batch",
    "observe",
    "qwen_batch",
    "sample_prompts",
    "select_qwen_rows",
    "select_rows",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_model",
    "tiny_qwen2_5_vl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)

"""The Qwen3-VL (``Qwen3VLForConditionalGeneration``) family and its mixture-of-experts variant
(``Qwen3VLMoeForConditionalGeneration``): their adapters (``adapter``), FLOPs models (``costs``) and tiny test
models (``testbed``, imported only by the test suites). Registered through the ``tokenpress.families``
entry-point group, as a third party's family would be."""

from __future__ import annotations

from tokenpress.core.hookspecs import hookimpl
from tokenpress.families.qwen3_vl.adapter import Qwen3VLAdapter, Qwen3VLMoeAdapter
from tokenpress.families.qwen3_vl.costs import Qwen3VLCosts, Qwen3VLMoeCosts
from tokenpress.runtime.adapter import ModelAdapter


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [Qwen3VLAdapter, Qwen3VLMoeAdapter]


__all__ = ["Qwen3VLAdapter", "Qwen3VLCosts", "Qwen3VLMoeAdapter", "Qwen3VLMoeCosts"]

"""Model adapters shipped with the core, registered through the same hook third parties use to add a family.

A family is one module: its adapter (a :class:`ModelAdapter`) and its FLOPs model (a
:class:`~tokenpress.flops.FamilyCosts`, the adapter's ``cost_model``); the adapter also names its tiny test
model (``test_family``, a record of :mod:`tokenpress.testing.families`)."""

from __future__ import annotations

from tokenpress.adapters.base import AttentionParts, ImageLayout, ImageSpan, ModelAdapter, ProjectorMLP
from tokenpress.adapters.llava import LlavaAdapter
from tokenpress.adapters.llava_next import LlavaNextAdapter
from tokenpress.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokenpress.hookspecs import hookimpl


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [LlavaAdapter, LlavaNextAdapter, Qwen2_5_VLAdapter]


__all__ = ["AttentionParts", "ImageLayout", "ImageSpan", "LlavaAdapter", "LlavaNextAdapter", "ModelAdapter",
           "ProjectorMLP", "Qwen2_5_VLAdapter"]

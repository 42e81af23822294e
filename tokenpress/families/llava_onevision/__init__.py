"""The LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) family: its adapter (``adapter``), its FLOPs
model (``costs``) and its tiny test model (``testbed``, imported only by the test suites). Registered through the
``tokenpress.families`` entry-point group, as a third party's family would be."""

from __future__ import annotations

from tokenpress.core.hookspecs import hookimpl
from tokenpress.families.llava_onevision.adapter import LlavaOnevisionAdapter
from tokenpress.families.llava_onevision.costs import LlavaOnevisionCosts
from tokenpress.runtime.adapter import ModelAdapter


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [LlavaOnevisionAdapter]


__all__ = ["LlavaOnevisionAdapter", "LlavaOnevisionCosts"]

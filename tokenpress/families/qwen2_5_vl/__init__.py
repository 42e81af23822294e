"""The Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) family: its adapter (``adapter``), its FLOPs model
(``costs``) and its tiny test model (``testbed``, imported only by the test suites). Registered through the
``tokenpress.families`` entry-point group, as a third party's family would be."""

from __future__ import annotations

from tokenpress.core.hookspecs import hookimpl
from tokenpress.families.qwen2_5_vl.adapter import Qwen2_5_VLAdapter
from tokenpress.families.qwen2_5_vl.costs import Qwen2_5_VLCosts
from tokenpress.runtime.adapter import ModelAdapter


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [Qwen2_5_VLAdapter]


__all__ = ["Qwen2_5_VLAdapter", "Qwen2_5_VLCosts"]

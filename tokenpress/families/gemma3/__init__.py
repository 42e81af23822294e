"""The Gemma 3 (``Gemma3ForConditionalGeneration``) family: its adapter (``adapter``), its FLOPs model (``costs``)
and its tiny test model (``testbed``, imported only by the test suites). Registered through the
``tokenpress.families`` entry-point group, as a third party's family would be."""

from __future__ import annotations

from tokenpress.core.hookspecs import hookimpl
from tokenpress.families.gemma3.adapter import Gemma3Adapter
from tokenpress.families.gemma3.costs import Gemma3Costs
from tokenpress.runtime.adapter import ModelAdapter


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [Gemma3Adapter]


__all__ = ["Gemma3Adapter", "Gemma3Costs"]

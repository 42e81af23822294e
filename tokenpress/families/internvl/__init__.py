"""The InternVL (``InternVLForConditionalGeneration``, model_type ``internvl``) family: its adapter
(``adapter``), its FLOPs model (``costs``) and its tiny test model (``testbed``, imported only by the test
suites). Registered through the ``tokenpress.families`` entry-point group, as a third party's family would be."""

from __future__ import annotations

from tokenpress.core.hookspecs import hookimpl
from tokenpress.families.internvl.adapter import InternVLAdapter
from tokenpress.families.internvl.costs import InternVLCosts
from tokenpress.runtime.adapter import ModelAdapter


@hookimpl
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    return [InternVLAdapter]


__all__ = ["InternVLAdapter", "InternVLCosts"]

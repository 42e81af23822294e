"""ldp: MobileVLM's lightweight downsample projector - pointwise layers and depthwise convolutions,
one with stride 2 - in place of the model's projector (576 -> 144 tokens on LLaVA-1.5)."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.ldp.method import LDP


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [LDP]


__all__ = ["LDP"]

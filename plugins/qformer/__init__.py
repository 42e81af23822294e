"""qformer: a BLIP-2-style Q-Former in place of the model's projector - N learned queries read the
visual tokens by cross-attention and become N summary tokens that stand for the whole image."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.qformer.method import QFormer


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [QFormer]


__all__ = ["QFormer"]

"""pixel_unshuffle: fold each r x r window of the patch grid into one token of r*r times the width
(InternVL2's pixel shuffle), then an MLP maps it to the LLM's width, in place of the projector."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.pixel_unshuffle.method import PixelUnshuffle


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [PixelUnshuffle]


__all__ = ["PixelUnshuffle"]

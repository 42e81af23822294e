"""FastV: after layer K-1, keep the visual tokens the last prompt token attends to most.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.fastv.method import FastV


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [FastV]


__all__ = ["FastV"]

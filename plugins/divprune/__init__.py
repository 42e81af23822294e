"""divprune: DivPrune - keep the visual tokens that form the most diverse subset (greedy max-min
diversity on cosine distance), training-free.

Alvar et al., *DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models*, CVPR 2025
(arXiv 2503.02175).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.divprune.method import DivPrune


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [DivPrune]


__all__ = ["DivPrune"]

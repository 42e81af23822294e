"""sparsevlm: SparseVLM - text-guided visual token sparsification inside the decoder: raters chosen
from the prompt rank the visual tokens by their attention, a rank-adaptive number is kept at a few
layers, and the best of the pruned tokens are recycled into cluster means.

Zhang et al., *SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference*,
ICML 2025 (arXiv 2410.04417).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.sparsevlm.method import SparseVLM


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [SparseVLM]


__all__ = ["SparseVLM"]

"""prumerge: PruMerge and PruMerge+ - adaptive token reduction from the vision encoder's CLS
attention (IQR outliers), each kept token merging its key-nearest neighbours.

Shang et al., *LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models*, 2024
(arXiv 2403.15388).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.prumerge.method import PruMerge


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [PruMerge]


__all__ = ["PruMerge"]

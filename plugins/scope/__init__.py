"""scope: SCOPE - saliency-coverage oriented token pruning: patches picked greedily by class-token attention
times the facility-location coverage they add on the encoder's feature similarity.

Deng et al., *SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs*, NeurIPS 2025
(arXiv 2510.24214).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.scope.method import Scope


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [Scope]


__all__ = ["Scope"]

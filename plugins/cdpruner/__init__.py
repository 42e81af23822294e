"""cdpruner: CDPruner - keep the visual tokens that maximise a conditional DPP (their similarity
weighted by their relevance to the instruction), by fast greedy MAP inference.

Zhang et al., *Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs*, NeurIPS 2025 (arXiv 2506.10967).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.cdpruner.method import CDPruner


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [CDPruner]


__all__ = ["CDPruner"]

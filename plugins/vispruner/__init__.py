"""vispruner: VisPruner - the patches the vision encoder's class token attends to most, plus diverse ones
among the rest after iterative de-duplication by feature similarity.

Zhang et al., *Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs*,
ICCV 2025 (arXiv 2412.01818).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.vispruner.method import VisPruner


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [VisPruner]


__all__ = ["VisPruner"]

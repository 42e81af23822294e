"""ALVTS: adaptive layer-wise visual token selection - before each decoder layer a low-rank selector
routes the most important visual tokens through it; the others skip it and rejoin afterwards.

Adaptive Layer-wise Visual Token Selection, CVPR 2026 (arXiv 2606.14277).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.alvts.method import ALVTS


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [ALVTS]


__all__ = ["ALVTS"]

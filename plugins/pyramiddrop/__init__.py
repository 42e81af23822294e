"""pyramiddrop: PyramidDrop - staged dropping of visual tokens inside the decoder: at a few layers the
visual tokens are ranked by the last instruction token's attention, recomputed with that layer's own
projections, and each stage keeps a share ``lambda`` of the tokens the previous stage left.

Xing et al., *PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction*, CVPR 2025 (arXiv 2410.17247).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.pyramiddrop.method import PyramidDrop


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [PyramidDrop]


__all__ = ["PyramidDrop"]

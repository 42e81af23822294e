"""visionzip: VisionZip - the dominant tokens the vision encoder's class token attends to most, and a
few contextual tokens merging the rest by key similarity.

Yang et al., *VisionZip: Longer is Better but Not Necessary in Vision Language Models*, CVPR 2025
(arXiv 2412.04467).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.visionzip.method import VisionZip


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [VisionZip]


__all__ = ["VisionZip"]

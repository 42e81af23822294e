"""vscan: VScan - two stages of visual token reduction: before the LLM, a global scan (the patches the
class token attends to most in the feature layer) and a local scan (the best patches of every window by a
shallow layer's class-token attention) choose the tokens kept and every other token is merged into its most
similar kept one; inside the LLM, at its middle layer, the tokens the last instruction token attends to
most are kept.

Zhang et al., *VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models*,
arXiv 2505.22654 (TMLR 2026).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.vscan.method import VScan


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [VScan]


__all__ = ["VScan"]

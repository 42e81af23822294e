"""dart: DART - duplication-aware visual token pruning: keep pivot tokens and the visual tokens that
duplicate them least, before an early decoder layer, training-free.

Wen et al., *Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More*,
EMNLP 2025 (arXiv 2502.11494).
"""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.dart.method import DART


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [DART]


__all__ = ["DART"]

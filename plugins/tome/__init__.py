"""tome: Token Merging inside the vision encoder (Bolya et al., *Token Merging: Your ViT But Faster*,
ICLR 2023): in every listed encoder block, bipartite soft matching on the block's keys merges ``r``
tokens into their most similar ones, sizes carried and attention made proportional to them."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.tome.method import Tome


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [Tome]


__all__ = ["Tome"]

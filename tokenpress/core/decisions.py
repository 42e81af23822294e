"""What a decoder-layer stage may decide about the visual tokens entering a layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Keep:
    """Keep the visual tokens where ``mask`` (B, N) is true; drop the others from this layer on.

    ``mask`` is over the layer's current sequence (``context.is_visual`` tells which slots are
    visual); its value at text and padding slots is ignored.
    """

    mask: torch.Tensor


@dataclass(frozen=True)
class Route:
    """Send only the visual tokens where ``mask`` (B, N) is true through this layer.

    The others skip the layer unchanged (they are not in its KV cache) and rejoin the sequence, in
    place, for the next layer.
    """

    mask: torch.Tensor


@dataclass(frozen=True)
class Merge:
    """Replace visual tokens by weighted merges of them, from this layer on (SparseVLM's recycling).

    ``group`` (B, N) over the layer's current sequence: for each visual token, the merged token
    ``g >= 0`` of its sample it joins, ``-1`` to keep it as it is, ``-2`` to drop it (values at text
    and padding slots are ignored). ``weight`` (B, N) weighs each member in its group's mean (default:
    its size, the patches it stands for). ``groups`` bounds ``g`` (a Python int: no device read).

    A merged token's hidden state is the weighted mean of its members'; it takes the slot, the position
    and the identity of its first member (the earliest in the sequence: under ``positions: original``
    the smallest position) and stands for every member's patches; its size is the sum of theirs. Like
    a ``Keep``, later layers (and their KV caches) hold the merged tokens only.
    """

    group: torch.Tensor
    groups: int
    weight: torch.Tensor | None = None


LayerDecision = Keep | Route | Merge

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


LayerDecision = Keep | Route

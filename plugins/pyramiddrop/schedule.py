"""PyramidDrop's schedule as plain arithmetic: where the stages sit on a decoder of any depth, how many
visual tokens each stage keeps, and the ``lambda`` that leaves a given share after the last stage. No
model knowledge and no tensors: everything here is known to the host before the forward pass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

#: The published stage boundaries of LLaVA-1.5 (the released scripts' ``layer_list``): the visual tokens
#: are ranked and dropped before these of its 32 decoder layers.
PUBLISHED_LAYERS = (8, 16, 24)
PUBLISHED_DEPTH = 32
#: The published share each stage keeps of the tokens the stage before left (576 / 288 / 144 / 72).
PUBLISHED_LAMBDA = 0.5


def stage_layers(num_layers: int) -> tuple[int, ...]:
    """The published boundaries scaled to a decoder of ``num_layers`` layers: ``floor(l * L / 32 + 0.5)``
    for l in 8, 16, 24, duplicates dropped, each inside the model and after layer 0 (a stage at layer 0
    would prune before the LLM has seen the image). 32 layers: 8, 16, 24; 28: 7, 14, 21; 4: 1, 2, 3."""
    scaled = {math.floor(layer * num_layers / PUBLISHED_DEPTH + 0.5) for layer in PUBLISHED_LAYERS}
    return tuple(sorted(layer for layer in scaled if 0 < layer < num_layers))


def kept(count: int, share: float) -> int:
    """Visual tokens a stage keeps of the ``count`` entering it: ``int(count * share)`` (truncated, as the
    released code computes its counts), at least one, never more than ``count`` (none of none). The product
    is exact, of ``share`` as written (700 x 0.7 is 490, where floats give 489.99...)."""
    if count <= 0:
        return 0
    return min(count, max(1, int(Fraction(repr(float(share))) * count)))


def counts_through(count: int, shares: Sequence[float]) -> list[int]:
    """The visual tokens left after each stage, starting from ``count``, each stage keeping its share of
    what the previous one left."""
    left = []
    for share in shares:
        count = kept(count, share)
        left.append(count)
    return left


def lambda_for_final_share(keep_ratio: float, stages: int = len(PUBLISHED_LAYERS)) -> float:
    """The single ``lambda`` whose ``stages`` stages leave about ``keep_ratio`` of the visual tokens after the
    last one: ``keep_ratio ** (1 / stages)``, rounded to 4 decimals (0.125 -> 0.5, the published setting)."""
    return round(keep_ratio ** (1.0 / stages), 4)


def mean_share(shares: Sequence[float], layers: Sequence[int], num_layers: int) -> float:
    """The mean share of the visual tokens per decoder layer (what the paper's budgets count): 1 before the
    first stage, then the product of the shares so far. Published: (8 + 8/2 + 8/4 + 8/8) / 32 = 0.469."""
    total, share, previous = 0.0, 1.0, 0
    for layer, stage_share in zip(layers, shares, strict=True):
        total += share * (layer - previous)
        share *= stage_share
        previous = layer
    return (total + share * (num_layers - previous)) / num_layers

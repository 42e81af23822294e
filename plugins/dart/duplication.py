"""DART as pure tensor code: pivot tokens, then for each pivot the visual tokens least similar to it.

No model knowledge: the method hands in, over the packed sequence entering the pruned decoder layer
(``method.py``), each slot's pivot score (the L1 norm of its key in the layer before), the features
whose cosine measures duplication (the hidden states through the LLM's final norm), which slots are
visual, which are the prompt's text after the image, and how many visual tokens each sample keeps.

The released code's steps, per sample:

1. image pivots: the ``image_pivots`` visual tokens with the largest key norm; text pivots: the
   ``text_pivots`` text tokens after the image with the largest key norm;
2. the pool: every other visual token;
3. for each pivot in turn, the pool tokens whose cosine similarity to the pivot is lowest join the kept
   set and leave the pool (each pivot takes its quota from what the earlier ones left);
4. kept: the image pivots and everything the pivots took (text pivots are text: they stay anyway).

Pivots take their turns in rank order (image pivots by key norm, largest first, then text pivots the
same way), ties to the lower slot; the quotas are :func:`quotas`. Nothing N x N: the similarities are
pivots x visual tokens. Every function works on a batch of samples (B, N) with masks, no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenpress.core.tokens import pack_index


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (the released code works in the model's dtype, fp16 in its evaluations), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """(B, N) each slot's key L1 norm over every head and channel, from ``keys`` (B, H, N, d) (post-rotary,
    as the released code captures them); in the compute dtype."""
    return keys.to(compute_dtype(keys.dtype)).abs().sum(dim=(1, 3))


def kept_total(visual: int, keep_ratio: float, image_pivots: int, text_pivots: int, budget: str) -> int:
    """Visual tokens a sample of ``visual`` keeps (a host int).

    ``"exact"``: ``round(keep_ratio x visual)`` (at least one), image pivots included. ``"released"``: the
    released code's count for ``M = round(keep_ratio x visual)`` (its ``max_num_trunction``): the image
    pivots plus ``M // P`` per pivot, ``P = image_pivots + text_pivots`` - 68 / 132 / 196 for M = 64 /
    128 / 192 with 4 + 4 pivots. Never more than ``visual``.
    """
    if visual <= 0:
        return 0
    target = max(1, round(visual * keep_ratio))
    if budget == "released":
        pivots = image_pivots + text_pivots
        target = min(image_pivots, visual) + pivots * (target // pivots)
    return min(visual, target)


def ranked(scores: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of ``mask`` (B, N) by descending ``scores`` (ties: the lower slot), the first ``width``
    of them, (B, width), and which of those are real (a row may mark fewer than ``width`` slots)."""
    masked = torch.where(mask, scores, -torch.inf)
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)[:, :width]
    if order.shape[1] < width:  # fewer slots than pivots asked for
        order = torch.cat([order, order.new_zeros(order.shape[0], width - order.shape[1])], dim=1)
    real = torch.arange(width, device=mask.device) < mask.shape[1]
    return order, torch.gather(mask, 1, order) & real


def lowest(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the ``counts[b]`` candidates with the lowest ``scores`` in each row (ties: the lower
    slot), compared in the scores' own dtype."""
    masked = torch.where(candidates, scores, torch.inf)
    order = torch.argsort(masked, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < counts.unsqueeze(1))


def quotas(remaining: torch.Tensor, pivot_valid: torch.Tensor) -> torch.Tensor:
    """(B, P) how many pool tokens each pivot takes: ``remaining`` (B,) (what the sample keeps beyond its
    image pivots) split over its real pivots in turn order, ``remaining // P`` each and one more for the
    first ``remaining % P``; 0 for a missing pivot. With the released budget and every pivot present this
    is the released code's ``M // P`` each."""
    present = pivot_valid.sum(-1).clamp_min(1)
    turn = pivot_valid.long().cumsum(-1) - 1
    share = (remaining // present).unsqueeze(1) + (turn < (remaining % present).unsqueeze(1)).long()
    return torch.where(pivot_valid, share, 0)


def select_keep(norms: torch.Tensor, features: torch.Tensor, visual: torch.Tensor, text_after: torch.Tensor,
                totals: torch.Tensor, image_pivots: int, text_pivots: int, width: int) -> torch.Tensor:
    """(B, N) bool: the visual slots DART keeps.

    ``norms`` (B, N) pivot scores; ``features`` (B, N, D) the duplication features (normalised here);
    ``visual`` and ``text_after`` (B, N) bool, the real visual slots and the pivot candidates among the
    text; ``totals`` (B,) long, visual tokens each sample keeps (at most its visual count); ``width`` the
    largest visual count (a host int).
    """
    batch, slots = visual.shape
    device = visual.device
    image_count = totals.clamp(max=image_pivots)  # the image pivots count within the budget
    image_order, image_valid = ranked(norms, visual, image_pivots)
    image_valid &= torch.arange(image_pivots, device=device) < image_count.unsqueeze(1)
    text_order, text_valid = ranked(norms, text_after, text_pivots)
    image_pivot = torch.zeros(batch, slots + 1, dtype=torch.bool, device=device)
    image_pivot = image_pivot.scatter_(1, torch.where(image_valid, image_order, slots), True)[:, :slots]
    pivots = torch.cat([image_order, text_order], dim=1)  # (B, P) in turn order
    pivot_valid = torch.cat([image_valid, text_valid], dim=1)

    unit = F.normalize(features.to(compute_dtype(features.dtype)), dim=-1)
    visual_index, visual_valid = pack_index(visual, width=width)  # (B, V)

    def rows(index: torch.Tensor) -> torch.Tensor:
        return torch.gather(unit, 1, index.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))

    similarity = torch.bmm(rows(pivots), rows(visual_index).transpose(1, 2))  # (B, P, V) cosines
    kept = torch.gather(image_pivot, 1, visual_index) & visual_valid
    pool = visual_valid & ~kept
    share = quotas(totals - image_count, pivot_valid)
    for turn in range(pivots.shape[1]):
        taken = lowest(similarity[:, turn], pool, share[:, turn])  # the least similar first
        kept |= taken
        pool &= ~taken
    out = torch.zeros(batch, slots + 1, dtype=torch.bool, device=device)
    out.scatter_(1, torch.where(visual_valid, visual_index, slots), kept)
    return out[:, :slots]


def duplication_flops(visual: int, pivots: int, width: int) -> float:
    """Matrix-product FLOPs of :func:`select_keep` for one sample of ``visual`` visual tokens: every pivot
    slot (``pivots`` of them, present or not) against every visual token, ``width`` wide."""
    return 2.0 * pivots * visual * width

"""Bipartite soft matching (Bolya et al., *Token Merging: Your ViT But Faster*, ICLR 2023) as pure
tensor code: which token merges into which, never the merge itself (that is
:meth:`tokenpress.TokenState.merge`, a size-weighted average with sizes and provenance kept).

Tokens alternate into two sets by slot: A and B. Each A token's most similar B token (cosine
similarity of a metric, e.g. the encoder block's keys averaged over heads) is its match; the ``r``
A tokens with the most similar matches merge into them. Where a class token precedes the tokens in
the model's sequence (CLIP), the alternation counts it: it would be the first A token, so the first
token of the state is in B. Rows are batched and may differ in length (their tokens in slots
0..n-1); nothing is read back from the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def bipartite_assign(metric: torch.Tensor, valid: torch.Tensor, merges: Sequence[int], *, class_token: bool,
                     keep_order: bool = False) -> torch.Tensor:
    """(I, N) long: the output slot of every token (-1 for padding) after merging ``merges[i]`` A
    tokens of row ``i`` into their best B match (at most half of the row's tokens: clamp before).

    ``metric`` (I, N, d) is compared by cosine similarity; ``valid`` (I, N) marks each row's real
    tokens, which must fill slots 0..n-1. Output order: ToMe's (the unmerged A tokens in slot order,
    then every B token) by default; ``keep_order=True`` keeps the survivors in their slot order
    (FOLDER's released code), a merged token taking its B token's place. The only pairwise tensor is
    the |A| x |B| score matrix (one, filled in place).
    """
    images, slots = valid.shape
    device = metric.device
    first_a = 1 if class_token else 0  # the class token would be A's first: then the first token is in B
    a_slots = torch.arange(first_a, slots, 2, device=device)
    b_slots = torch.arange(1 - first_a, slots, 2, device=device)
    unit = metric.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    valid_a, valid_b = valid[:, a_slots], valid[:, b_slots]
    scores = unit[:, a_slots] @ unit[:, b_slots].transpose(-1, -2)  # (I, |A|, |B|)
    scores.masked_fill_(~valid_b.unsqueeze(1), float("-inf"))
    best, match = scores.max(dim=-1)  # each A token's most similar B token
    del scores
    best = best.masked_fill(~valid_a, float("-inf"))
    order = torch.argsort(best, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
    merged = (rank < torch.as_tensor(list(merges), device=device).unsqueeze(1)) & valid_a
    kept_a = valid_a & ~merged
    assign = torch.full((images, slots), -1, dtype=torch.long, device=device)
    if keep_order:
        survives = valid.clone()
        survives[:, a_slots] = kept_a
        place = torch.cumsum(survives.long(), dim=-1) - 1
        b_place = place[:, b_slots]
        assign[:, a_slots] = torch.where(kept_a, place[:, a_slots], torch.gather(b_place, 1, match))
        assign[:, b_slots] = torch.where(valid_b, b_place, -1)
    else:
        unmerged = kept_a.sum(-1, keepdim=True)
        b_place = unmerged + torch.arange(b_slots.numel(), device=device)
        unmerged_place = torch.cumsum(kept_a.long(), dim=-1) - 1
        assign[:, a_slots] = torch.where(kept_a, unmerged_place, torch.gather(b_place, 1, match))
        assign[:, b_slots] = torch.where(valid_b, b_place, -1)
    return torch.where(valid, assign, -1)


def most_merges(count: int) -> int:
    """The most A tokens one matching can merge in a row of ``count`` tokens (ToMe's ``(t - protected) // 2``,
    the same with a class token or without)."""
    return count // 2


def matching_scores(count: int) -> int:
    """Entries of the |A| x |B| score matrix of one matching over ``count`` tokens."""
    return (count // 2) * (count - count // 2)

"""SparseVLM's text raters and token counts, as pure tensor code (no model knowledge).

Batched over samples: every sample is a row, padded to the batch's widest, with a validity mask; each
row's result is the one it gives alone.
"""

from __future__ import annotations

import torch

#: The share of the pruned tokens that is recycled (the reference's ``int(0.3 * pruned) + 1``).
RECYCLE_SHARE = 0.3
#: Recycled tokens per cluster (the reference's ``int(recycled / 10) + 1`` clusters).
TOKENS_PER_CLUSTER = 10


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 for products and distances (half-precision models included)."""
    return torch.promote_types(dtype, torch.float32)


def choose_raters(visual: torch.Tensor, visual_valid: torch.Tensor, text: torch.Tensor,
                  candidates: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters: the text tokens most related to the image, from the LLM input embeddings.

    ``visual`` (B, V, D) and ``text`` (B, T, D) are embeddings, ``visual_valid`` (B, V) and
    ``candidates`` (B, T) mark the real visual tokens and the text tokens that may rate (those after the
    image). Each visual token spreads a softmax over the candidates (``v · tᵀ``); averaged over the
    visual tokens that gives one value per candidate, and the raters are the candidates above the mean
    of those values. When none is above it (all equal, e.g. a single candidate) every candidate rates.
    Returns (B, T) bool.
    """
    dtype = compute_dtype(visual.dtype)
    logits = torch.matmul(visual.to(dtype), text.to(dtype).transpose(-1, -2))  # (B, V, T)
    logits = logits.masked_fill(~candidates.unsqueeze(1), float("-inf"))
    has_candidates = candidates.any(-1, keepdim=True)
    logits = logits.masked_fill(~has_candidates.unsqueeze(1), 0.0)  # no candidate: no NaN from an all -inf row
    probs = torch.softmax(logits, dim=-1) * visual_valid.unsqueeze(-1)
    relevance = probs.sum(1) / visual_valid.sum(-1, keepdim=True).clamp_min(1)  # (B, T)
    mean = (relevance * candidates).sum(-1, keepdim=True) / candidates.sum(-1, keepdim=True).clamp_min(1)
    above = candidates & (relevance > mean)
    return torch.where(above.any(-1, keepdim=True), above, candidates)


def relation_rank(relation: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Rank of each sample's raters x visual attention matrix, as ``torch.linalg.matrix_rank`` computes it.

    ``relation`` (B, R, N) holds the matrix with zeros outside each sample's ``rows`` raters and
    ``columns`` visual tokens (zero rows and columns add no rank); singular values above
    ``max(rows, columns) * eps * largest`` count, the tolerance of that sample's own matrix. (B,) long.
    """
    relation = relation.float()
    values = torch.linalg.svdvals(relation)  # (B, min(R, N)), descending
    largest = values[..., :1]
    size = torch.maximum(rows, columns).unsqueeze(-1).to(values.dtype)
    return (values > largest * size * torch.finfo(values.dtype).eps).sum(-1)


def rank_keep_counts(rank: torch.Tensor, visual: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """The paper's adaptive count: keep ``min(int(rank * scale + bias), visual - 1)`` visual tokens; a
    full-rank matrix (rank == visual tokens) prunes nothing, and neither does rank 0 (no rater: no
    evidence to rank by). (B,) long."""
    wanted = torch.trunc(rank.double() * scale + bias).long().clamp_min(0)
    keep = torch.minimum(wanted, visual - 1)
    return torch.where((rank == visual) | (rank == 0), visual, keep)


def recycled_count(pruned: torch.Tensor) -> torch.Tensor:
    """How many of ``pruned`` tokens are recycled: ``int(0.3 * pruned) + 1``, none of none. (B,) long."""
    count = (pruned.double() * RECYCLE_SHARE).floor().long() + 1
    return torch.where(pruned > 0, count, 0)


def recycled_count_on_host(pruned: int) -> int:
    """:func:`recycled_count` of a Python int (the same arithmetic, in double precision)."""
    return int(pruned * RECYCLE_SHARE) + 1 if pruned > 0 else 0


def cluster_count(recycled: torch.Tensor | int) -> torch.Tensor | int:
    """Clusters the recycled tokens form: ``recycled // 10 + 1``, none of none (tensor or int)."""
    if isinstance(recycled, int):
        return recycled // TOKENS_PER_CLUSTER + 1 if recycled > 0 else 0
    return torch.where(recycled > 0, recycled // TOKENS_PER_CLUSTER + 1, 0)

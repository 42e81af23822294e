"""ALVTS's selector as pure tensor code: low-rank projections and the importance score.

No model knowledge here: the method (``method.py``) takes a layer's weights, norms and rotary
tables from the model adapter and hands tensors to these functions.

* :func:`low_rank` - ``W ~ U V`` from a truncated SVD, ``U = U_R S_R^1/2`` and ``V = S_R^1/2 V_R^T``.
* :func:`importance` - ``S(i) = S_V2V(i) * S_T2V(i)``: the mean attention visual token ``i``
  receives from the visual tokens, times the mean it receives from the prompt's text tokens, with
  the layer's causal softmax over all keys, averaged over heads. A chunk of query rows at a time,
  each against the keys up to its last row only (so no (rows x keys) matrix larger than ``chunk x keys``
  per head ever exists, and the causal half is never computed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """``y = up @ (down @ x) + bias``: a rank-``R`` stand-in for a linear layer ``y = W x + b``."""

    down: torch.Tensor  # (R, in)
    up: torch.Tensor  # (out, R)
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(torch.matmul(x, self.down.transpose(0, 1)), self.up.transpose(0, 1))
        return y if self.bias is None else y + self.bias

    def to(self, reference: torch.Tensor) -> LowRank:
        """The same factors on ``reference``'s device and dtype."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=reference.device, dtype=reference.dtype)

        return LowRank(cast(self.down), cast(self.up), cast(self.bias))

    def parameters(self) -> list[torch.Tensor]:
        return [self.down, self.up]


def low_rank(weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> LowRank:
    """The truncated SVD of ``weight`` (out x in) at ``rank``, split evenly: ``U_R S^1/2`` and ``S^1/2 V_R^T``.

    At ``rank = min(out, in)`` it reproduces ``weight`` up to float32 rounding.
    """
    matrix = weight.detach().to(torch.float32)
    rank = max(1, min(rank, *matrix.shape))
    left, singular, right = torch.linalg.svd(matrix, full_matrices=False)
    root = singular[:rank].sqrt()
    up = left[:, :rank] * root
    down = root.unsqueeze(1) * right[:rank]
    return LowRank(down.contiguous(), up.contiguous(), None if bias is None else bias.detach().to(torch.float32))


def block_causal_pairs(length: int, chunk: int) -> int:
    """Query-key pairs :func:`importance` scores on ``length`` slots, ``chunk`` rows at a time: each block
    of rows against the keys up to its last row (the diagonal block whole, masked after)."""
    return sum(min(chunk, length - start) * min(start + chunk, length) for start in range(0, length, chunk))


def importance(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    scaling: float,
    chunk: int = 64,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``S_V2V * S_T2V`` of every slot, (B, N) float32; zero outside the real visual slots.

    ``query`` (B, H, N, d) and ``key`` (B, H, N, d) are rotated (keys repeated for grouped-query
    attention); ``valid``, ``visual``, ``text`` (B, N) mark real slots (left-packed: a sample's real slots
    come first), visual slots and the text rows whose attention counts for ``S_T2V``. A row attends
    causally (slot order) to real keys. ``combine(v2v, t2v)`` replaces the product (for ablations).

    Every slot is a query row, weighted (visual, text) or 0; ``chunk`` rows at a time, each block of rows
    against the keys up to its last row only (causality: the keys after it are never computed), the mask
    needed on the block's own diagonal alone. Memory: ``chunk x N`` per head; work: half the rows x keys
    products a full matrix would take.
    """
    batch, heads, length, _ = query.shape
    visual, text = visual & valid, text & valid & ~visual
    weights = torch.stack([visual, text], 1).float()  # (B, 2, N): which rows count for S_V2V and S_T2V
    # contiguous once: the rotated (B, N, H, d) views would otherwise be copied by every chunk's product
    scaled = (query.float() * scaling).contiguous()
    keys = key.float().transpose(-1, -2).contiguous()  # (B, H, d, N)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu(1)  # a block's future keys
    totals = torch.zeros(batch, 2, length, dtype=torch.float32, device=query.device)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        rows = stop - start
        logits = torch.matmul(scaled[:, :, start:stop], keys[..., :stop])  # (B, H, c, stop)
        logits[..., start:stop].masked_fill_(upper[:rows, :rows], -torch.inf)
        probs = torch.softmax(logits, dim=-1).view(batch, heads * rows, stop)
        # the weighted sum over the block's rows and every head in one product: (B, 2, H*c) @ (B, H*c, stop)
        row_weights = weights[..., start:stop].unsqueeze(2).expand(batch, 2, heads, rows).reshape(batch, 2, -1)
        totals[..., :stop] += torch.bmm(row_weights, probs)
    totals /= heads
    v2v = totals[:, 0] / visual.sum(-1, keepdim=True).clamp_min(1)
    t2v = totals[:, 1] / text.sum(-1, keepdim=True).clamp_min(1)
    score = combine(v2v, t2v) if combine is not None else v2v * t2v
    return score * visual


def coverage_curve(scores: torch.Tensor, candidates: torch.Tensor, points: int = 101) -> torch.Tensor:
    """For each sample, the share of the total score held by its best ``f`` candidates, at ``points``
    fractions ``f`` from 0 to 1: (B, points). What ``budget: adaptive`` learns from."""
    fractions = torch.linspace(0, 1, points, device=scores.device)
    curves = []
    for row, mask in zip(scores, candidates, strict=True):
        values = torch.sort(row[mask].float(), descending=True).values
        total = values.sum().clamp_min(1e-30)
        cumulative = torch.cat([values.new_zeros(1), torch.cumsum(values, 0) / total])
        taken = torch.round(fractions * values.numel()).long()
        curves.append(cumulative[taken])
    return torch.stack(curves)

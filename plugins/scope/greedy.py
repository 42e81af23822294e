"""SCOPE as pure tensor code: greedy saliency-weighted facility-location selection. No model knowledge:
the method hands in each image row's class-token attention, features and budget (``method.py``).

The released objective: with ``S`` the cosine similarity of the row's features and ``c`` the coverage of
every patch by the patches chosen so far (``c_k = max(0, max over chosen s of S_sk)``, 0 at first), each
step picks the patch ``j`` maximising ``gain_j * w_j`` (``"multiply"``, the published default; ``"add"``:
``gain_j + w_j``), where

    gain_j = sum over every patch k of max(0, S_kj - c_k)        w_j = attention_j ** alpha

(first maximum on ties), then raises the coverage with ``S_j·``. K steps keep K patches.

Every gain needs the whole of ``S`` at every step, so the similarity is held for the K steps: this is
the algorithm's one pairwise matrix (N x N per row, declared by the method). It is held *as the residual*
``D_kj = max(0, S_kj - c_k)``, updated in place: when ``s`` is chosen, coverage ``c_k`` rises by exactly
``D_ks`` (``max(c_k, S_ks) - c_k = max(0, S_ks - c_k)``, S symmetric), so ``D <- max(0, D - D_·s)``
row-wise, and ``gain = D.sum(over k)``. No other N x N temporary is made (the released code makes two per
step); the rest is O(N) per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Combine = Literal["multiply", "add"]


def saliency(attention: torch.Tensor, alpha: float) -> torch.Tensor:
    """``attention ** alpha``: each patch's weight (the released ``cls_attn ** alpha``)."""
    return attention ** alpha


def greedy_group(features: torch.Tensor, weight: torch.Tensor, steps: int,
                 combine: Combine = "multiply") -> torch.Tensor:
    """(G, steps) long: the patches the greedy picks, in the order picked, in each of G rows of N patches -
    ``features`` (G, N, C), ``weight`` (G, N) the saliency weights; ``steps <= N``."""
    groups, patches, _ = features.shape
    device = features.device
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = F.normalize(features.to(dtype), dim=-1)
    residual = torch.bmm(unit, unit.transpose(1, 2)).clamp_(min=0.0)  # D = max(0, S - 0): the one N x N per row
    weight = weight.to(dtype)
    available = torch.ones(groups, patches, dtype=torch.bool, device=device)
    picks = torch.empty(groups, steps, dtype=torch.long, device=device)
    for step in range(steps):
        gain = residual.sum(dim=1)  # (G, N): sum over the covered patches k
        score = gain * weight if combine == "multiply" else gain + weight
        chosen = score.masked_fill(~available, float("-inf")).argmax(dim=-1, keepdim=True)  # first maximum
        picks[:, step:step + 1] = chosen
        available.scatter_(1, chosen, False)
        if step + 1 < steps:
            raised = torch.gather(residual, 2, chosen.unsqueeze(1).expand(-1, patches, 1))  # (G, N, 1): D_ks
            residual.sub_(raised).clamp_(min=0.0)
    return picks


def row_slices(rows: list[int]) -> list[slice]:
    """Rows of the batch as slices (views: no index tensor is copied to the device): one strided slice when
    they are evenly spaced (every row; LLaVA-NeXT's alternating base-tile and high-resolution rows), else one
    slice per row."""
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and all(rows[i + 1] - rows[i] == step for i in range(len(rows) - 1)):
        return [slice(rows[0], rows[-1] + 1, step)]
    return [slice(row, row + 1) for row in rows]


def select_rows(attention: torch.Tensor, features: torch.Tensor, patches: Sequence[int], kept: Sequence[int],
                alpha: float = 1.0, combine: Combine = "multiply") -> torch.Tensor:
    """(I, P) bool: the patches SCOPE keeps in each row r of ``patches[r]`` real patches (its first slots)
    out of ``attention`` (I, P) and ``features`` (I, P, C), ``kept[r]`` of them (``kept[r] >= patches[r]``
    keeps the row whole). Rows of equal shape go together; each row's result is the one it has alone."""
    images, slots = attention.shape
    device = attention.device
    mask = torch.zeros(images, slots, dtype=torch.bool, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (count, keep) in enumerate(zip(patches, kept, strict=True)):
        groups.setdefault((count, min(keep, count)), []).append(row)
    for (count, keep), rows in groups.items():
        for part in row_slices(rows):
            if keep >= count:
                mask[part, :count] = True
                continue
            chosen = greedy_group(features[part, :count], saliency(attention[part, :count], alpha), keep, combine)
            mask[part] = mask[part].scatter(1, chosen, True)
    return mask


def selection_flops(patches: int, kept: int, width: int) -> float:
    """Matrix-product FLOPs of :func:`select_rows` on one row (2 per multiply-add): the similarity of every
    patch to every patch, ``2 · N² · width``; nothing when the row keeps all its patches. The K greedy steps
    are element-wise (about 3 N² operations each, not counted by torch's FLOP counter)."""
    return 0.0 if kept >= patches else 2.0 * patches * patches * width


def pairwise_scores(patches: int, kept: int) -> int:
    """The pairwise scores held per row: N x N (the residual similarity), none when the row keeps all."""
    return 0 if kept >= patches else patches * patches

"""VisPruner as pure tensor code: the important patches (highest class-token attention) and, among the
rest, the diverse ones, left after iterative de-duplication on the cosine similarity of the encoder's
features. No model knowledge: the method hands in each image row's attention, features and budgets
(``method.py``).

The de-duplication is the released code's, round by round: the residual patches (those not important, in
the order the previous round left them - descending attention at first) are split alternately into A
(even places) and B (odd places); each A patch scores its highest cosine similarity to any B patch; the
``cut`` A patches scoring highest are dropped; the residual becomes the kept A patches (in descending
score order) followed by B. ``cut = min(8, R - T_div, |A|)`` for R residual patches and T_div diverse
ones: the released loop takes ``min(8, R - T_div)`` and breaks when it reaches 0; ``|A|`` is the fix for
the rounds it could not run (see :func:`dedup_rounds`).

Each round scores every A patch against every B patch at once, as the released code does (an |A| x |B|
block, like ToMe's bipartite matching: the method declares it as its pairwise step), so a round is a handful
of kernels. Rows are processed in groups of equal shape (patch count and budgets), batched; every size is a
Python int, so nothing reads the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: At most this many A patches are dropped per round (the released code's constant).
ROUND = 8


def split_budget(kept: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) patches of a row keeping ``kept``: ``int(kept * important_ratio)`` important
    (the released ``int(T * r)``, rounding down) and the rest diverse."""
    important = int(kept * important_ratio)
    return important, kept - important


def dedup_rounds(residual: int, diverse: int) -> list[tuple[int, int, int]]:
    """The rounds that bring ``residual`` patches down to ``diverse``: (|A|, |B|, cut) of each, where
    |A| = ceil(R / 2) and |B| = floor(R / 2) split the R patches left and ``cut`` A patches are dropped.

    ``cut = min(8, R - diverse, |A|)``. The released loop takes ``min(8, R - diverse)`` and sizes the kept
    A patches as ``R // 2 - cut``: right for even R only (with odd R, |A| is ``R // 2 + 1`` and its index
    tensors do not broadcast, so it fails: e.g. T = 90, r = 0.5 on 576 patches), and negative when 8
    exceeds |A| (a diverse budget under 8). Here the kept A patches are always the |A| - cut not dropped,
    and a round drops at most all of A; where the released code runs, the rounds are its rounds.
    ``diverse == 0`` has no rounds: the residual is dropped whole (what the rounds would end with)."""
    rounds = []
    if diverse <= 0:
        return rounds
    while True:
        half_a, half_b = (residual + 1) // 2, residual // 2
        cut = min(ROUND, residual - diverse, half_a)
        if cut <= 0:
            return rounds
        rounds.append((half_a, half_b, cut))
        residual -= cut


def dedup_flops(residual: int, diverse: int, width: int) -> float:
    """Matrix-product FLOPs of the de-duplication (2 per multiply-add): ``2 · |A| · |B| · width`` for every
    round that keeps some of A (a round dropping all of A needs no scores)."""
    return sum(2.0 * half_a * half_b * width for half_a, half_b, cut in dedup_rounds(residual, diverse)
               if cut < half_a)


def selection_flops(patches: int, kept: int, important_ratio: float, width: int) -> float:
    """FLOPs of :func:`select_rows` on one row of ``patches`` patches keeping ``kept`` (nothing when it keeps
    them all)."""
    if kept >= patches:
        return 0.0
    important, diverse = split_budget(kept, important_ratio)
    return dedup_flops(patches - important, diverse, width)


def pairwise_block(patches: int, kept: int, important_ratio: float) -> int:
    """The most A x B scores a round forms at once on one row: the first scored round's |A| x |B| (the
    residual only shrinks), at most N² / 4; none when the row keeps all its patches."""
    if kept >= patches:
        return 0
    important, diverse = split_budget(kept, important_ratio)
    return max((half_a * half_b for half_a, half_b, cut in dedup_rounds(patches - important, diverse)
                if cut < half_a), default=0)


def _nearest_b(unit: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(G, |A|): each A patch's highest cosine similarity to any B patch, A and B the even and odd places of
    ``residual`` (G, R) patch indices, ``unit`` (G, N, C) the unit features."""
    tokens = torch.gather(unit, 1, residual.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # (G, R, C)
    return torch.bmm(tokens[:, 0::2], tokens[:, 1::2].transpose(1, 2)).amax(-1)  # the |A| x |B| block


def select_group(scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int) -> torch.Tensor:
    """(G, important + diverse) long: the patches VisPruner keeps in each of G rows of the same shape -
    ``scores`` (G, N) class-token attention, ``features`` (G, N, C) - the important ones (in descending
    attention) then the diverse ones (in the residual's last order). Ties: the lower patch, the lower place."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    kept_important, residual = order[:, :important], order[:, important:]
    if diverse == 0:
        return kept_important
    unit = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
    for half_a, _, cut in dedup_rounds(residual.shape[1], diverse):
        part_a, part_b = residual[:, 0::2], residual[:, 1::2]
        if cut < half_a:
            similarity = _nearest_b(unit, residual)
            survivors = torch.argsort(similarity, dim=-1, descending=True, stable=True)[:, cut:]
            part_a = torch.gather(part_a, 1, survivors)
        else:
            part_a = part_a[:, :0]
        residual = torch.cat([part_a, part_b], dim=1)
    return torch.cat([kept_important, residual], dim=1)


def row_slices(rows: list[int]) -> list[slice]:
    """Rows of the batch as slices (views: no index tensor is copied to the device): one strided slice when
    they are evenly spaced (every row; LLaVA-NeXT's alternating base-tile and high-resolution rows), else one
    slice per row."""
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and all(rows[i + 1] - rows[i] == step for i in range(len(rows) - 1)):
        return [slice(rows[0], rows[-1] + 1, step)]
    return [slice(row, row + 1) for row in rows]


def select_rows(scores: torch.Tensor, features: torch.Tensor, patches: Sequence[int], kept: Sequence[int],
                important_ratio: float) -> torch.Tensor:
    """(I, P) bool: the patches VisPruner keeps in each row r of ``patches[r]`` real patches (its first
    slots) out of ``scores`` (I, P) class-token attention and ``features`` (I, P, C), ``kept[r]`` of them
    (``kept[r] >= patches[r]`` keeps the row whole). Rows of equal shape go together; each row's result
    is the one it has alone."""
    images, slots = scores.shape
    device = scores.device
    mask = torch.zeros(images, slots, dtype=torch.bool, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (count, keep) in enumerate(zip(patches, kept, strict=True)):
        groups.setdefault((count, min(keep, count)), []).append(row)
    for (count, keep), rows in groups.items():
        for part in row_slices(rows):
            if keep >= count:
                mask[part, :count] = True
                continue
            important, diverse = split_budget(keep, important_ratio)
            chosen = select_group(scores[part, :count], features[part, :count], important, diverse)
            mask[part] = mask[part].scatter(1, chosen, True)
    return mask

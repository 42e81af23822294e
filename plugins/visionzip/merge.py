"""VisionZip as pure tensor code: the dominant patches, the contextual targets, each remaining patch's
most similar target, and the contextual tokens. No model knowledge: the method hands in each image
row's CLS attention, keys and features, and does the bookkeeping (``method.py``).

Every function works on a batch of rows (I, P), so rows of different lengths (LLaVA-NeXT's base tile
and stitched grid) go together; widths are given as Python ints, so nothing reads the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenpress.core.select import topk_mask
from tokenpress.core.tokens import pack_index

#: Patches whose nearest target is searched at once: the similarity block is (I, CHUNK, contextual).
CHUNK = 64


def contextual_targets(remaining: torch.Tensor, contextual: torch.Tensor) -> torch.Tensor:
    """(I, P) bool: the targets among each row's ``remaining`` patches (I, P) - every
    ``max(1, R // C)``-th of its R remaining patches in raster order, the first C of them, C being the
    row's ``contextual`` (I,) count (none where it is 0)."""
    count = remaining.sum(-1)
    step = (count // contextual.clamp_min(1)).clamp_min(1).unsqueeze(1)
    rank = torch.cumsum(remaining.long(), -1) - 1  # a remaining patch's place among them
    return remaining & (rank % step == 0) & (rank // step < contextual.unsqueeze(1))


def nearest_target(keys: torch.Tensor, targets: torch.Tensor, target_valid: torch.Tensor,
                   to_merge: torch.Tensor, widest: int) -> torch.Tensor:
    """(I, P) long: for every patch of ``to_merge`` (I, P) bool, the place (0 .. C-1) among its row's
    targets of the one whose key is the most similar (cosine; ties: the first); -1 elsewhere.

    ``targets`` (I, C) are the targets' patch indices, ``target_valid`` (I, C) which are real;
    ``widest`` is the largest number of patches to merge in a row. The (to-merge x targets) similarity
    is computed ``CHUNK`` patches at a time, so memory stays linear in the patch count.
    """
    images, patches = to_merge.shape
    choice = torch.full((images, patches + 1), -1, dtype=torch.long, device=keys.device)  # + a dump column
    if widest == 0 or targets.shape[1] == 0:
        return choice[:, :patches]
    unit = F.normalize(keys.to(torch.promote_types(keys.dtype, torch.float32)), p=2, dim=-1)
    target_unit = torch.gather(unit, 1, targets.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    members, member_valid = pack_index(to_merge, width=widest)
    for start in range(0, widest, CHUNK):
        rows = members[:, start:start + CHUNK]  # (I, c)
        query = torch.gather(unit, 1, rows.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        similarity = torch.bmm(query, target_unit.transpose(1, 2))  # (I, c, C): the only matrix product
        similarity = similarity.masked_fill(~target_valid.unsqueeze(1), float("-inf"))
        best = similarity.argmax(-1)
        slots = torch.where(member_valid[:, start:start + CHUNK], rows, patches)
        choice.scatter_(1, slots, best)
    return choice[:, :patches]


def contextual_features(features: torch.Tensor, targets: torch.Tensor, target_valid: torch.Tensor,
                        choice: torch.Tensor) -> torch.Tensor:
    """(I, C, D): each target's feature plus the mean of the features of the patches that chose it
    (``choice`` (I, P), from :func:`nearest_target`; plus nothing where none did), summed in at least
    float32; zeros where ``target_valid`` (I, C) is false."""
    images, count = targets.shape
    dim = features.shape[-1]
    wide = features.to(torch.promote_types(features.dtype, torch.float32))
    slot = torch.where(choice >= 0, choice, count)  # count: a dump slot for the patches that merge nowhere
    sums = wide.new_zeros(images, count + 1, dim).scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, dim), wide)
    members = wide.new_zeros(images, count + 1).scatter_add_(1, slot, torch.ones_like(wide[..., 0]))
    mean = sums[:, :count] / members[:, :count].clamp_min(1).unsqueeze(-1)
    centre = torch.gather(wide, 1, targets.unsqueeze(-1).expand(-1, -1, dim))
    return ((centre + mean) * target_valid.unsqueeze(-1)).to(features.dtype)


class Zipped(NamedTuple):
    """What VisionZip makes of a batch of rows (I, P)."""

    dominant: torch.Tensor  # (I, P) bool: the dominant patches
    target: torch.Tensor  # (I, P) bool: the contextual tokens' targets
    targets: torch.Tensor  # (I, C) long: the contextual targets' patches, in raster order
    target_valid: torch.Tensor  # (I, C) bool: which of them are real
    choice: torch.Tensor  # (I, P) long: a merged patch's target (its place in ``targets``), else -1
    contextual: torch.Tensor  # (I, C, D): the contextual tokens, one per target


def zip_rows(scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, valid: torch.Tensor,
             patches: Sequence[int], dominant: Sequence[int], contextual: Sequence[int]) -> Zipped:
    """VisionZip on every row r of ``patches[r]`` real patches (``valid`` (I, P)): its ``dominant[r]``
    patches of highest CLS attention ``scores`` (I, P) (ties: the first), and ``contextual[r]``
    contextual tokens made of the others by the cosine similarity of their ``keys`` (I, P, C') and
    their ``features`` (I, P, D). A row without contextual tokens drops its other patches. The counts
    are Python ints (nothing is read from the device), ``dominant[r] + contextual[r] <= patches[r]``."""
    device = valid.device
    contextual_count = torch.tensor(list(contextual), dtype=torch.long, device=device)
    is_dominant = topk_mask(scores, valid, torch.tensor(list(dominant), dtype=torch.long, device=device))
    remaining = valid & ~is_dominant
    is_target = contextual_targets(remaining, contextual_count)
    to_merge = remaining & ~is_target & (contextual_count > 0).unsqueeze(1)
    targets, target_valid = pack_index(is_target, width=max(contextual, default=0))
    widest = max((real - kept - merged if merged else 0 for real, kept, merged in
                  zip(patches, dominant, contextual, strict=True)), default=0)
    choice = nearest_target(keys, targets, target_valid, to_merge, widest)
    return Zipped(is_dominant, is_target, targets, target_valid, choice,
                  contextual_features(features, targets, target_valid, choice))

"""PruMerge as pure tensor code: the IQR outlier count, PruMerge+'s spatial samples, and the
neighbour merge. No model knowledge: the method hands in each image row's CLS attention, keys and
features (``method.py``).

Every function works on a batch of rows (I, P) with ``valid`` marking real patches, so rows of
different lengths (LLaVA-NeXT's base tile and stitched grid) go together, with no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Kept rows whose neighbour search runs at once: the similarity block is (I, CHUNK, P).
CHUNK = 64


def outlier_share(scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many patches to keep (I,) long, and the outlier share (I,) float64 - the share of
    the row's scores above Q3 + 1.5 IQR, the quartiles interpolated linearly (NumPy's default
    ``percentile``) over the row's real patches. The count is ``int(N * share)``, as the reference
    computes it (that float round trip kept), and at least one (the reference fails with none)."""
    masked = torch.where(valid, scores.double(), torch.full_like(scores, float("nan"), dtype=torch.float64))
    q1, q3 = torch.nanquantile(masked, torch.tensor([0.25, 0.75], dtype=torch.float64, device=scores.device),
                               dim=-1, interpolation="linear")
    above = (masked > (q3 + 1.5 * (q3 - q1)).unsqueeze(-1)) & valid
    real = valid.sum(-1).double().clamp_min(1)
    share = above.sum(-1).double() / real
    return torch.floor(real * share).long().clamp_min(1), share


def spatial_samples(share: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(I, P) bool: PruMerge+'s uniform samples - every ``int(int(1 / share) / 3)``-th patch (at least
    every one), from the first to the second-to-last, ``share`` being the row's outlier share (at least
    one patch's)."""
    real = valid.sum(-1).clamp_min(1)
    step = torch.floor(1.0 / torch.maximum(share, 1.0 / real.double())).long()
    stride = (step // 3).clamp_min(1)
    slots = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    return (slots % stride.unsqueeze(1) == 0) & (slots < (real - 1).unsqueeze(1)) & valid


def merge_neighbours(features: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                     kept: torch.Tensor, picked: torch.Tensor, neighbours: int) -> torch.Tensor:
    """(I, K, D): each kept token plus the sum of its ``neighbours`` nearest other patches by key
    cosine similarity, each weighted by its CLS attention (PruMerge's update, unnormalised).

    ``kept`` (I, K) holds the kept patches' indices, ``picked`` (I, K) which of them are real.
    Candidates are every other real patch of the row, kept or not.
    """
    unit = F.normalize(keys.float(), p=2, dim=-1)
    images, count = kept.shape
    out = torch.zeros(images, count, features.shape[-1], dtype=features.dtype, device=features.device)
    slots = torch.arange(valid.shape[1], device=valid.device)
    available = valid.sum(-1).clamp_min(1) - 1
    take = max(0, min(neighbours, valid.shape[1] - 1))
    for start in range(0, count, CHUNK):
        rows = kept[:, start:start + CHUNK]  # (I, c)
        query = torch.gather(unit, 1, rows.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        similarity = torch.bmm(query, unit.transpose(1, 2))  # (I, c, P): the largest temporary
        candidate = valid.unsqueeze(1) & (slots.view(1, 1, -1) != rows.unsqueeze(-1))
        similarity = similarity.masked_fill(~candidate, float("-inf"))
        _, nearest = torch.topk(similarity, take, dim=-1)  # (I, c, take)
        # a row with fewer candidates than `take` picks some -inf ones: they weigh nothing
        real = torch.arange(take, device=valid.device).view(1, 1, -1) < available.view(-1, 1, 1)
        weights = torch.gather(scores.unsqueeze(1).expand(-1, rows.shape[1], -1), 2, nearest) * real
        gathered = torch.gather(features.unsqueeze(1).expand(-1, rows.shape[1], -1, -1), 2,
                                nearest.unsqueeze(-1).expand(-1, -1, -1, features.shape[-1]))
        centre = torch.gather(features, 1, rows.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        out[:, start:start + CHUNK] = centre + (gathered * weights.unsqueeze(-1).to(features.dtype)).sum(2)
    return out * picked.unsqueeze(-1)


def rest_token(features: torch.Tensor, scores: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(I, D): the patches not kept, summed weighted by their CLS attention (the reference's extra token)."""
    return (features * (scores * rest).unsqueeze(-1).to(features.dtype)).sum(1)

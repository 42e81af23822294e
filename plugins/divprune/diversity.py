"""DivPrune as pure tensor code: greedy max-min diversity (farthest point) selection on cosine distance.

No model knowledge: the method hands in rows of tokens (one image row each), which of their slots are
real, and how many each row keeps (``method.py``).

The released code builds the N x N cosine distance ``1 - U Uᵀ`` of the unit tokens ``U``, picks first
the token whose nearest other token is farthest, then repeatedly the token whose smallest distance to
the tokens already picked is largest (max-min). Here:

* the first pick needs every token's nearest neighbour, an inherently all-pairs step: it is computed
  ``chunk`` query tokens at a time (``chunk`` x N distances alive at once, never N x N);
* the max-min steps keep one running minimum per token (the distance to the nearest picked token),
  updated with one column of distances per pick: O(N) memory, O(N·D) work per pick. The released code
  re-takes the minimum over every picked row at each step; the running minimum is the same number.

Memory O(chunk·N + N·D), FLOPs ``2·N·D·(N + K - 1)`` per row (:func:`selection_flops`). Every function
works on a batch of rows (R, N) with ``valid`` marking real tokens, with no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Query tokens of the nearest-neighbour pass computed at once (chunk x N distances alive).
DEFAULT_CHUNK = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (the released code runs in the model's dtype, fp16 in its evaluations), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def unit_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(R, N, D) the tokens scaled to unit length, in the compute dtype (their dot products are cosines)."""
    return F.normalize(tokens.to(compute_dtype(tokens.dtype)), dim=-1)


def nearest_other_distance(unit: torch.Tensor, valid: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(R, N) each real token's cosine distance to its nearest *other* real token of its row (``inf``
    when it has none; padding slots get ``inf`` too, callers mask them).

    The released code takes the second smallest entry of each column of the full distance matrix (the
    smallest being the token itself, at distance ~0); excluding the token itself is the exact form of
    that rule. ``chunk`` query tokens at a time: (R, chunk, N) distances alive, never N x N.
    """
    rows, slots, _ = unit.shape
    device = unit.device
    nearest = unit.new_full((rows, slots), torch.inf)
    others = unit.transpose(1, 2)  # (R, D, N)
    column = torch.arange(slots, device=device)
    for start in range(0, slots, chunk):
        stop = min(start + chunk, slots)
        distance = 1.0 - torch.bmm(unit[:, start:stop], others)  # (R, c, N)
        itself = column[start:stop].unsqueeze(1) == column.unsqueeze(0)  # (c, N)
        excluded = itself.unsqueeze(0) | ~valid.unsqueeze(1)
        nearest[:, start:stop] = distance.masked_fill_(excluded, torch.inf).amin(-1)
    return nearest


def farthest_points(unit: torch.Tensor, valid: torch.Tensor, steps: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(R, steps) the slots the greedy max-min selection picks, in the order picked.

    First pick: the real token whose nearest other token is farthest. Each next pick: the real token
    not picked yet whose distance to the nearest picked token is largest. Ties go to the lower slot
    (``argmax``'s first maximum, as in the released code). A picked token is never picked again: the
    released code relies on its self-distance being 0, which fp16 rounding breaks (see the README). A
    row with fewer real tokens than ``steps`` picks slot 0 past them (callers mask picks beyond a row's
    count).
    """
    rows = unit.shape[0]
    device = unit.device
    picks = torch.zeros(rows, steps, dtype=torch.long, device=device)
    if steps == 0:
        return picks
    row_index = torch.arange(rows, device=device)
    available = valid.clone()
    nearest = nearest_other_distance(unit, valid, chunk)
    chosen = torch.where(valid, nearest, -torch.inf).argmax(-1)
    closest = None  # distance of every token to its nearest picked token, (R, N)
    for step in range(steps):
        if step:
            chosen = torch.where(available, closest, -torch.inf).argmax(-1)
        picks[:, step] = chosen
        available[row_index, chosen] = False
        if step == steps - 1:
            break
        # one column of distances: every token against the new pick
        distance = 1.0 - torch.bmm(unit, unit[row_index, chosen].unsqueeze(-1)).squeeze(-1)
        closest = distance if closest is None else torch.minimum(closest, distance)
    return picks


def select_mask(tokens: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor, max_count: int,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(R, N) bool: the ``counts[r]`` tokens (``counts`` (R,) long, at most each row's real tokens,
    ``max_count`` their largest value as a host int) DivPrune keeps in row r of ``tokens`` (R, N, D)."""
    rows, slots = valid.shape
    picks = farthest_points(unit_tokens(tokens), valid, max_count, chunk)
    real = torch.arange(max_count, device=valid.device).unsqueeze(0) < counts.unsqueeze(1)
    mask = torch.zeros(rows, slots + 1, dtype=torch.bool, device=valid.device)
    mask.scatter_(1, torch.where(real, picks, slots), True)  # picks past a row's count go to a dump column
    return mask[:, :slots] & valid


def selection_flops(tokens: int, kept: int, width: int) -> float:
    """Matrix-product FLOPs of :func:`select_mask` on one row of ``tokens`` real tokens keeping ``kept``,
    ``width`` wide (2 per multiply-add, as torch's FLOP counter): the nearest-neighbour pass (every token
    against every token, ``2·N²·D``) and one column of distances per pick but the last (``2·N·D`` each).
    Nothing when the row keeps all its tokens (the stage does no work)."""
    if kept <= 0 or kept >= tokens:
        return 0.0
    return 2.0 * tokens * width * (tokens + kept - 1)

"""CDPruner as pure tensor code: instruction relevance, the conditional DPP kernel and its greedy MAP.

No model knowledge: the method hands in each image row's visual tokens, the mean direction of its
prompt's text embeddings, and how many tokens each row keeps (``method.py``).

The conditional kernel is ``L = diag(q) S diag(q)`` with ``S`` the cosine similarity of the visual
tokens and ``q`` their relevance to the instruction. Writing ``b_i = q_i x_i / |x_i|`` gives
``L = B Bᵀ``. The greedy is the fast greedy MAP inference of Chen et al. (NeurIPS 2018), an incremental
Cholesky factorisation of the chosen items, in one of two forms that pick the same items:

* **kernel** (N ≤ 2·D: the N x N kernel is at most twice the size of the features): ``L`` built with one
  matrix product, then each new Cholesky row is ``(L_j· - Σ_t c_tj c_t·) / d_j``, a product over the k
  rows so far. Time O(N²·D + N·k²), memory O(N² + k·N). Each pick reads O(k·N) numbers.
* **low-rank** (more tokens than that: long videos): ``L`` is never built; each new Cholesky row is
  ``B w`` with ``w`` the unit direction of the chosen item's residual (Gram-Schmidt over the chosen
  items only). Memory O(N·D + k·D), linear in the tokens even when k grows with them; time
  O(N·D·k + D·k²), but each pick reads all of ``B`` (a matrix-vector product), so on 576 tokens of width
  512 it is 3x slower than the kernel form, and 10x at width 4096 (measured on a 2-core CPU).

Every function works on a batch of rows (R, N) with ``valid`` marking real tokens, so rows of
different lengths go together, with no host read on an accelerator and no Python loop over tokens.
On the CPU the kernel form's picks run in NumPy, whose per-operation cost is a fraction of torch's
(the same picks; :func:`_greedy_map_kernel_on_host`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tokenpress import host_loop_allowed, pack_index

#: Added to the min-max range of the relevance, as the published code does: no token gets zero quality.
RELEVANCE_EPS = 1e-6
#: Below this residual norm an item adds no new direction (its gain is zero up to rounding).
RESIDUAL_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (the published code computes the kernel in float32), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def text_direction(text: torch.Tensor) -> torch.Tensor:
    """(D,) the mean of the unit-normalised text embeddings ``text`` (T, D) (zeros when T = 0).

    The mean cosine similarity of a visual token to the T text tokens is its cosine to each, averaged:
    a dot product with this one vector, so relevance costs O(N·D) whatever the prompt's length.
    """
    unit = F.normalize(text.to(compute_dtype(text.dtype)), dim=-1)
    return unit.sum(0) / max(text.shape[0], 1)


def unit_tokens(visual: torch.Tensor) -> torch.Tensor:
    """(R, N, D) the visual tokens scaled to unit length, in the compute dtype: what both the
    similarity ``S`` (their cosines) and the relevance are made of."""
    return F.normalize(visual.to(compute_dtype(visual.dtype)), dim=-1)


def relevance(unit: torch.Tensor, valid: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(R, N) instruction relevance of each visual token, in (0, 1] on real tokens (0 on padding).

    As the published code: the negated mean cosine similarity of the token to the instruction's
    embeddings (``unit`` (R, N, D) from :func:`unit_tokens` against ``direction`` (R, D), see
    :func:`text_direction`), min-max normalised over each row's real tokens with ``RELEVANCE_EPS``
    added to the numerator (a row whose scores are all equal gets 1 everywhere).
    """
    cosine = torch.bmm(unit, direction.to(unit.dtype).unsqueeze(-1)).squeeze(-1)  # (R, N)
    score = -cosine
    low = torch.where(valid, score, torch.inf).amin(-1, keepdim=True)
    high = torch.where(valid, score, -torch.inf).amax(-1, keepdim=True)
    scaled = (score - low + RELEVANCE_EPS) / (high - low).clamp_min(RELEVANCE_EPS)
    return torch.where(valid, scaled, 0.0)


def quality(relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """Each token's quality ``q`` in the kernel: the relevance itself (the published default), or with
    the trade-off ``theta`` in (0, 1), ``exp(alpha · relevance)`` with ``alpha = theta / (2 (1 - theta))``
    (the quality-diversity weighting of Chen et al.: ``log det L_Y = theta/(1-theta) Σ r + log det S_Y``)."""
    if theta is None:
        return relevance
    return torch.exp(theta / (2.0 * (1.0 - theta)) * relevance)


def uses_kernel(tokens: int, width: int) -> bool:
    """Whether :func:`greedy_map` builds the N x N kernel: where it is at most twice the features' size."""
    return tokens <= 2 * width


def greedy_map(items: torch.Tensor, valid: torch.Tensor, steps: int, kernel: bool | None = None,
               lengths: list[int] | None = None) -> torch.Tensor:
    """(R, steps) the slots the fast greedy MAP inference picks, in the order picked: at each step the
    available real token with the largest marginal gain ``det(L_{Y+i}) / det(L_Y)`` (ties: the lower
    slot), for the kernel ``L = items · itemsᵀ`` (``items`` (R, N, D); for CDPruner ``b_i = q_i x_i / |x_i|``).

    Always ``steps`` picks, as the published code (no early stop when the gains reach zero); a row
    with fewer real tokens than ``steps`` picks slot 0 past them (callers mask picks beyond a row's
    count). ``kernel`` chooses the form (module docstring; default: :func:`uses_kernel`). ``lengths``, each
    row's real tokens as host ints where the caller knows them, lets the kernel form build each row's kernel
    over its real tokens only (rows of different lengths in one batch: LLaVA-NeXT's base tile and grid).
    """
    longest = max(lengths) if lengths else items.shape[1]
    if not (kernel if kernel is not None else uses_kernel(longest, items.shape[2])):
        return _greedy_map_low_rank(items, valid, steps)
    if lengths is None or all(length == items.shape[1] for length in lengths):
        return _greedy_map_kernel(items, valid, steps, torch.bmm(items, items.transpose(1, 2)))
    index, packed_valid = pack_index(valid, width=longest)  # each row's real tokens first
    packed = torch.gather(items, 1, index.unsqueeze(-1).expand(-1, -1, items.shape[-1]))
    matrix = items.new_zeros(items.shape[0], longest, longest)
    for row, length in enumerate(lengths):  # a few image rows: each kernel over its own tokens only
        matrix[row, :length, :length] = packed[row, :length] @ packed[row, :length].T
    return torch.gather(index, 1, _greedy_map_kernel(packed, packed_valid, steps, matrix))


def _greedy(gain: torch.Tensor, valid: torch.Tensor, steps: int,
            cholesky_row: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The picks of the greedy both forms share: ``gain`` (R, N) the residual variances ``d_i² = L_ii``;
    ``cholesky_row(step, chosen, gain)`` the chosen items' new Cholesky row (R, N), which each form
    computes its own way."""
    rows = gain.shape[0]
    available = valid.clone()
    picks = torch.zeros(rows, steps, dtype=torch.long, device=gain.device)
    row_index = torch.arange(rows, device=gain.device)
    for step in range(steps):
        chosen = torch.where(available, gain, -torch.inf).argmax(-1)  # the first maximum: lower slot on a tie
        picks[:, step] = chosen
        available[row_index, chosen] = False
        if step == steps - 1:
            break
        row = cholesky_row(step, chosen, gain)
        gain = (gain - row.square()).clamp_min(0.0)  # a residual variance is never negative
    return picks


def _greedy_map_kernel(items: torch.Tensor, valid: torch.Tensor, steps: int, kernel: torch.Tensor,
                       on_host: bool | None = None) -> torch.Tensor:
    """The greedy on ``kernel`` = ``L`` (R, N, N), built once; Cholesky rows ``(L_j· - Σ_t c_tj c_t·) / d_j``.

    ``on_host`` (default: :func:`tokenpress.host_loop_allowed`) runs the same steps in NumPy
    (:func:`_greedy_map_kernel_on_host`)."""
    if on_host if on_host is not None else host_loop_allowed(kernel):
        return _greedy_map_kernel_on_host(kernel, valid, steps)
    rows, slots, _ = items.shape
    cholesky = items.new_zeros(rows, max(steps - 1, 0), slots)  # the chosen items' Cholesky rows c_t, (R, k-1, N)
    row_index = torch.arange(rows, device=items.device)

    def cholesky_row(step: int, chosen: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        row = kernel[row_index, chosen]  # (R, N)
        if step:
            earlier = cholesky[:, :step]  # (R, step, N)
            column = earlier[row_index, :, chosen]  # the chosen item's Cholesky entries so far, (R, step)
            row = row - torch.bmm(column.unsqueeze(1), earlier).squeeze(1)
        scale = gain[row_index, chosen].clamp_min(0.0).sqrt().unsqueeze(-1)  # d_j, the residual's norm
        row = torch.where(scale > RESIDUAL_EPS, row / scale.clamp_min(RESIDUAL_EPS), 0.0)
        cholesky[:, step] = row
        return row

    return _greedy(kernel.diagonal(dim1=1, dim2=2).clone(), valid, steps, cholesky_row)


def _greedy_map_kernel_on_host(kernel: torch.Tensor, valid: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`_greedy_map_kernel`'s steps in NumPy, for a kernel in CPU memory: a pick is about twenty
    operations on a few hundred numbers, and torch's per-operation dispatch costs more than their
    arithmetic (288 picks of 576 tokens, two rows, on 2 CPU cores: 25-45 ms in torch, 10 ms here)."""
    matrix = kernel.detach().numpy()
    rows, slots, _ = matrix.shape
    gain = np.diagonal(matrix, axis1=1, axis2=2).copy()
    available = valid.numpy().copy()
    cholesky = np.zeros((rows, max(steps - 1, 0), slots), dtype=matrix.dtype)
    picks = np.zeros((rows, steps), dtype=np.int64)
    row_index = np.arange(rows)
    for step in range(steps):
        chosen = np.where(available, gain, -np.inf).argmax(-1)  # the first maximum: lower slot on a tie
        picks[:, step] = chosen
        available[row_index, chosen] = False
        if step == steps - 1:
            break
        row = matrix[row_index, chosen]
        if step:
            earlier = cholesky[:, :step]
            row = row - np.matmul(earlier[row_index, :, chosen][:, None], earlier)[:, 0]
        scale = np.sqrt(np.maximum(gain[row_index, chosen], 0.0))[:, None]
        row = np.where(scale > RESIDUAL_EPS, row / np.maximum(scale, RESIDUAL_EPS), 0.0)
        cholesky[:, step] = row
        gain = np.maximum(gain - row * row, 0.0)
    return torch.from_numpy(picks)


def _greedy_map_low_rank(items: torch.Tensor, valid: torch.Tensor, steps: int) -> torch.Tensor:
    """The greedy without ``L``: Cholesky rows ``B w`` from the chosen item's unit residual direction."""
    rows, _, width = items.shape
    directions = items.new_zeros(rows, max(steps - 1, 0), width)  # unit residual directions w, (R, k-1, D)
    row_index = torch.arange(rows, device=items.device)

    def cholesky_row(step: int, chosen: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        item = items[row_index, chosen]  # (R, D)
        residual = item
        if step:
            earlier = directions[:, :step]  # (R, step, D)
            column = torch.bmm(earlier, item.unsqueeze(-1))  # the chosen item's Cholesky entries so far
            residual = item - torch.bmm(earlier.transpose(1, 2), column).squeeze(-1)
        norm = residual.norm(dim=-1, keepdim=True)
        direction = torch.where(norm > RESIDUAL_EPS, residual / norm.clamp_min(RESIDUAL_EPS), 0.0)
        directions[:, step] = direction
        # (L_j· - Σ_t c_tj c_t·) / d_j = B w: the chosen item's kernel row made orthogonal
        return torch.bmm(items, direction.unsqueeze(-1)).squeeze(-1)  # (R, N)

    return _greedy((items * items).sum(-1), valid, steps, cholesky_row)


def select_mask(visual: torch.Tensor, valid: torch.Tensor, direction: torch.Tensor, counts: torch.Tensor,
                max_count: int, theta: float | None = None, lengths: list[int] | None = None) -> torch.Tensor:
    """(R, N) bool: the ``counts[r]`` tokens (``counts`` (R,) long, at most each row's real tokens,
    ``max_count`` their largest value as a host int) that the conditional DPP's greedy MAP keeps in
    row r of ``visual`` (R, N, D), for the instruction ``direction`` (R, D) (:func:`text_direction`);
    ``lengths``: each row's real tokens as host ints, where known (see :func:`greedy_map`)."""
    rows, slots = valid.shape
    unit = unit_tokens(visual)
    score = quality(relevance(unit, valid, direction), theta)
    items = unit.mul_((score * valid).to(unit.dtype).unsqueeze(-1))  # b_i = q_i x_i / |x_i|; padding zero
    picks = greedy_map(items, valid, max_count, lengths=lengths)
    real = torch.arange(max_count, device=valid.device).unsqueeze(0) < counts.unsqueeze(1)
    mask = torch.zeros(rows, slots + 1, dtype=torch.bool, device=valid.device)
    mask.scatter_(1, torch.where(real, picks, slots), True)  # picks past a row's count go to a dump column
    return mask[:, :slots] & valid


def selection_flops(tokens: int, kept: int, width: int) -> float:
    """Matrix-product FLOPs of :func:`select_mask` on one row of ``tokens`` real tokens keeping ``kept``,
    ``width`` wide (2 per multiply-add, as torch's FLOP counter): the relevance (one N x D product), then
    in the kernel form the kernel (N x N x D) and, at pick t of all but the last, the t earlier Cholesky
    rows (a t x N product); in the low-rank form, for each pick but the last, a Cholesky row (N x D) and
    the Gram-Schmidt of the chosen item against the earlier directions (two t x D products at step t)."""
    if kept <= 0 or kept >= tokens:
        return 0.0
    if uses_kernel(tokens, width):
        return 2.0 * tokens * width + 2.0 * tokens * tokens * width + 1.0 * tokens * (kept - 1) * (kept - 2)
    return 2.0 * tokens * width * kept + 2.0 * width * (kept - 1) * (kept - 2)

"""VScan's first stage as pure tensor code: the windows of each image's patch grid, the local scan (the
best patches of every window by a shallow layer's class-token attention, equal quotas per window), the
global scan (the best of the rest by the feature layer's), and each remaining token's most similar kept
token (cosine, after the projector). No model knowledge: the method hands in each image row's scores and
projected tokens and does the bookkeeping (``method.py``).

Every function works on a batch of rows (I, N) with ``candidates``/``valid`` marking real tokens, so rows
of different grids (LLaVA-NeXT's base tile and stitched grid) go together; widths are Python ints known
to the host, so nothing reads the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tokenpress.core.select import topk_mask
from tokenpress.core.tokens import pack_index

#: Tokens whose nearest kept token is searched at once: the similarity block is (I, CHUNK, kept).
CHUNK = 64


def split(kept: int) -> tuple[int, int]:
    """(local, global) tokens of a row keeping ``kept``: ``int(kept / 2)`` local, the rest global (the
    released code's fixed 1:1 split)."""
    local = kept // 2
    return local, kept - local


def window_layout(height: int, width: int, window: int) -> tuple[int, int]:
    """(window rows, window columns) of an ``height`` x ``width`` grid cut into ``window`` x ``window`` cells:
    whole windows only, the cells left over at the bottom and right edges joining the last window of their
    row / column (a grid smaller than a window is one window). 24 x 24 by 6: 4 x 4 (the released layout)."""
    return max(height // window, 1), max(width // window, 1)


def window_count(grid: tuple[int, int, int], window: int) -> int:
    """Windows of a (t, h, w) grid: each frame cut alike."""
    frames, height, width = grid
    rows, cols = window_layout(height, width, window)
    return frames * rows * cols


def window_ids(grid_index: torch.Tensor, grid: torch.Tensor, window: int) -> torch.Tensor:
    """(I, N) long: the window of each token's cell (``grid_index`` into the row's ``grid`` (I, 3) = t, h, w),
    numbered frame by frame in raster order of the windows (see :func:`window_layout`)."""
    height, width = grid[:, 1:2].clamp_min(1), grid[:, 2:3].clamp_min(1)
    rows, cols = (height // window).clamp_min(1), (width // window).clamp_min(1)
    cell = grid_index.clamp_min(0)
    frame, within = cell // (height * width), cell % (height * width)
    row = torch.minimum((within // width) // window, rows - 1)
    col = torch.minimum((within % width) // window, cols - 1)
    return (frame * rows + row) * cols + col


def window_rank(scores: torch.Tensor, candidates: torch.Tensor, window: torch.Tensor, windows: int) -> torch.Tensor:
    """(I, N) long: each candidate's place (0 = best) among the candidates of its window by ``scores``
    (ties: the lower slot first); ``windows`` bounds the window numbers. Two stable sorts, no loop."""
    masked = torch.where(candidates, scores.float(), float("-inf"))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)  # best first, ties to the lower slot
    window = torch.where(candidates, window, windows)  # non-candidates in a window of their own
    window_in_order = torch.gather(window, 1, order)
    regroup = torch.argsort(window_in_order, dim=-1, stable=True)  # window by window, best first within
    slots = torch.gather(order, 1, regroup)
    grouped = torch.gather(window_in_order, 1, regroup)
    place = torch.arange(scores.shape[1], device=scores.device).expand_as(slots)
    first = torch.full((scores.shape[0], windows + 1), scores.shape[1], dtype=torch.long, device=scores.device)
    first.scatter_reduce_(1, grouped, place, reduce="amin")
    return torch.empty_like(slots).scatter_(1, slots, place - torch.gather(first, 1, grouped))


def local_scan(scores: torch.Tensor, candidates: torch.Tensor, window: torch.Tensor, windows: Sequence[int],
               counts: Sequence[int]) -> torch.Tensor:
    """(I, N) bool: row r's ``counts[r]`` local picks - its candidates walked from the best ``scores`` down,
    each taken while its window holds fewer than ``ceil(counts[r] / windows[r])`` picks (the released Qwen
    path's walk). When the windows divide the count evenly this is the released LLaVA path exactly: the top
    ``counts[r] / windows[r]`` of every window."""
    device = scores.device
    quota = torch.tensor([-(-count // max(number, 1)) for count, number in zip(counts, windows, strict=True)],
                         dtype=torch.long, device=device)
    rank = window_rank(scores, candidates, window, max(windows, default=1))
    eligible = candidates & (rank < quota.unsqueeze(1))
    return topk_mask(scores, eligible, torch.tensor(list(counts), dtype=torch.long, device=device))


def global_scan(scores: torch.Tensor, candidates: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(I, N) bool: row r's ``counts[r]`` best ``candidates`` by ``scores`` (ties: the lower slot)."""
    return topk_mask(scores, candidates, torch.tensor(list(counts), dtype=torch.long, device=scores.device))


def nearest_kept(embeddings: torch.Tensor, kept: torch.Tensor, others: torch.Tensor, kept_width: int,
                 widest: int) -> torch.Tensor:
    """(I, N) long: for every token of ``others`` (I, N) bool, the place (0 .. kept - 1, in slot order) among
    its row's ``kept`` tokens of the one whose embedding is the most cosine-similar (ties: the first); -1
    elsewhere. ``kept_width`` / ``widest`` are the most kept / other tokens of a row. Computed ``CHUNK``
    tokens at a time (one matrix product each, in at least float32): memory linear in the tokens."""
    images, slots = kept.shape
    choice = torch.full((images, slots + 1), -1, dtype=torch.long, device=kept.device)  # + a dump column
    if widest == 0 or kept_width == 0:
        return choice[:, :slots]
    unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), p=2, dim=-1)
    dim = unit.shape[-1]
    kept_index, kept_valid = pack_index(kept, width=kept_width)
    kept_unit = torch.gather(unit, 1, kept_index.unsqueeze(-1).expand(-1, -1, dim))
    members, member_valid = pack_index(others, width=widest)
    for start in range(0, widest, CHUNK):
        rows = members[:, start:start + CHUNK]
        query = torch.gather(unit, 1, rows.unsqueeze(-1).expand(-1, -1, dim))
        similarity = torch.bmm(query, kept_unit.transpose(1, 2))  # (I, c, kept): the only matrix product
        similarity = similarity.masked_fill(~kept_valid.unsqueeze(1), float("-inf"))
        best = similarity.argmax(-1)
        choice.scatter_(1, torch.where(member_valid[:, start:start + CHUNK], rows, slots), best)
    return choice[:, :slots]


def merge_assign(kept: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """(I, N) long: each token's output slot for ``TokenState.merge`` - a kept token its place among the
    kept (raster order), a merged one its chosen kept token's place, -1 for the rest."""
    place = torch.cumsum(kept.long(), -1) - 1
    return torch.where(kept, place, torch.where(choice >= 0, choice, -1))


def merge_flops(tokens_in: int, kept: int, width: int) -> float:
    """The similarity products of :func:`nearest_kept` on one row: every merged token against every kept
    one over the projected width (2 FLOPs per multiply-add)."""
    return 2.0 * max(tokens_in - kept, 0) * kept * width if kept < tokens_in else 0.0

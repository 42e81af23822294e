"""Pure tensor helpers for selection methods (no model knowledge)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, mark the ``counts[r]`` highest-scoring candidate slots (ties: lower slot first).

    ``scores`` and ``candidates`` are (R, N); ``counts`` is (R,). Returns an (R, N) bool mask that is
    a subset of ``candidates``.
    """
    masked = torch.where(candidates, scores.float(), float("-inf"))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < counts.unsqueeze(1))


def seeded_uniform(key: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` uniform numbers from a CPU generator seeded with ``key`` (same on every device).

    A longer draw with the same key starts with the shorter one, so padding never changes a draw.
    """
    generator = torch.Generator().manual_seed(key % (2**63 - 1))
    return torch.rand(count, generator=generator).to(device)


def host_loop_allowed(tensor: torch.Tensor) -> bool:
    """Whether a method may run a sequential loop (a greedy's picks) on host arrays, NumPy, instead of
    torch: where ``tensor`` is in CPU memory, so no device waits for the host, and no torch dispatch mode
    is watching (a FLOP counter, the contract kit's synchronisation check, a memory tracker must see
    torch's operations). Per pick, NumPy's few-microsecond operations beat torch's dispatch."""
    return tensor.device.type == "cpu" and _get_current_dispatch_mode() is None

"""Measure what a piece of code allocates, op by op (any device), to tell linear from quadratic.

``torch.cuda.max_memory_allocated`` does not exist on the CPU; instead a dispatch mode sees every
tensor an operator creates. Outputs that alias an input (views) are not new memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class AllocationStats:
    """Bytes of new tensors created while the tracker was active."""

    total_bytes: int = 0
    largest_bytes: int = 0
    largest_shape: tuple[int, ...] = ()
    ops: int = 0
    shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)


class AllocationTracker(TorchDispatchMode):
    """``with AllocationTracker() as tracker: ...`` then read ``tracker.stats``."""

    def __init__(self, keep_shapes: bool = False) -> None:
        super().__init__()
        self.stats = AllocationStats()
        self.keep_shapes = keep_shapes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.numel()}
        self.stats.ops += 1
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            if tensor.untyped_storage().data_ptr() in inputs:
                continue
            size = tensor.numel() * tensor.element_size()
            self.stats.total_bytes += size
            if size > self.stats.largest_bytes:
                self.stats.largest_bytes = size
                self.stats.largest_shape = tuple(tensor.shape)
            if self.keep_shapes:
                self.stats.shapes.append((str(func), tuple(tensor.shape)))
        return out


def growth_exponent(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size): ~1 for linear growth, ~2 for quadratic."""

    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den

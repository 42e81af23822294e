"""Measuring stacks: per-stage timing through the observation hooks, peak memory, profiler traces.

Everything here observes; nothing changes what a stack computes. Stage timings come from a
``wrapper=True`` implementation of ``tokenpress_run_stage`` (each stage call is also a
``torch.profiler.record_function`` range named ``tokenpress:<stage>``, so it shows in traces).
On a GPU, timings use CUDA events; on the CPU, ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from tokenpress.core.hookspecs import hookimpl
from tokenpress.core.registry import get_registry
from tokenpress.runtime import compat


def stage_label(stage: Any, point: str, payload: Any) -> str:
    """The label a stage call gets in timings, FLOPs and traces (the report's ``stage layer i``)."""
    return stage.label() + (f" layer {payload.layer_index}" if point == "decoder_layer" else "")


class LiveMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storage created (and still alive) inside the block, on any device.

    ``torch.cuda.max_memory_allocated`` has no CPU counterpart; this sees every storage an operator
    creates and when it is freed, so it measures the extra memory a computation needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen:
                continue
            size = storage.nbytes()
            self._seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, size)
        return out


@dataclass
class StageTiming:
    """Time spent inside each stage's own hook calls (seconds), summed over calls."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class StageTimer:
    """An observer plugin: times every stage call and names it in profiler traces."""

    def __init__(self) -> None:
        self.timing = StageTiming()
        self.enabled = True

    @hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage: Any, method: Any, point: str, payload: Any, call: Any) -> Any:
        if not self.enabled:
            return (yield)
        label = stage_label(stage, point, payload)
        cuda = torch.cuda.is_available()
        with torch.profiler.record_function(f"tokenpress:{label}"):
            if cuda:
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
            else:
                start = time.perf_counter()
            result = yield
            if cuda:
                end_event.record()
                end_event.synchronize()
                elapsed = start_event.elapsed_time(end_event) / 1000
            else:
                elapsed = time.perf_counter() - start
        self.timing.seconds[label] += elapsed
        self.timing.calls[label] += 1
        return result


@contextlib.contextmanager
def observing(observer: Any) -> Iterator[Any]:
    """Register an observer plugin (hook wrappers) in the process registry for the duration of the block."""

    manager = get_registry().plugin_manager
    manager.register(observer, name=f"tokenpress-observer-{id(observer)}")
    try:
        yield observer
    finally:
        manager.unregister(observer)


def stage_timer() -> contextlib.AbstractContextManager[StageTimer]:
    """A :class:`StageTimer` registered for the duration of the block."""
    return observing(StageTimer())


def timed(fn: Any) -> float:
    """Seconds ``fn()`` takes (CUDA-synchronised on a GPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(fn: Any) -> int:
    """Peak extra bytes ``fn()`` allocates: CUDA's allocator statistics on a GPU, else a live tracker."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveMemoryTracker() as tracker:
        fn()
    return tracker.peak


class StageFlops:
    """An observer plugin: FLOPs (``torch.utils.flop_counter``) of every stage call and of the prefill."""

    def __init__(self) -> None:
        self.flops: dict[str, float] = defaultdict(float)
        self.total_prefill = 0.0

    @hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage: Any, method: Any, point: str, payload: Any, call: Any) -> Any:
        label = stage_label(stage, point, payload)
        with FlopCounterMode(display=False) as counter:
            result = yield
        self.flops[label] += compat.counted_flops(counter)
        return result

    @hookimpl(wrapper=True)
    def tokenpress_prefill(self, adapter: Any, batch_size: int, call: Any) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = yield
        self.total_prefill += compat.counted_flops(counter)
        return result


def stage_flops() -> contextlib.AbstractContextManager[StageFlops]:
    """A :class:`StageFlops` counter registered for the duration of the block."""
    return observing(StageFlops())

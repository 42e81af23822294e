"""Finding host-device synchronisations, on a GPU and on a CPU.

On CUDA, :class:`SyncRecorder` records what ``torch.cuda.set_sync_debug_mode`` reports. A CPU has
nothing to synchronise with, but the operations that make CUDA wait are the same on every device:
a tensor read as a Python number (``.item()``, ``int()``, ``bool()``, ``.tolist()``), and operations
whose output *size* depends on tensor values (``nonzero``, boolean-mask indexing, ``masked_select``,
``repeat_interleave`` without ``output_size``, ``unique``, ``bincount``, ``equal``).
:class:`DataDependentOps` records those through a ``TorchDispatchMode``, so CI, which has no GPU,
still fails code that would stall a GPU. :func:`recording_syncs` picks the right one for a device.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenpress

__all__ = ["DataDependentOps", "SyncEvent", "SyncRecorder", "recording_syncs", "sync_origin"]


@dataclass
class SyncEvent:
    """A host-device synchronisation seen inside a stage call, with the line that caused it."""

    message: str
    origin: str  # "method" (the plugin's own code or what it calls) or "core" (a tokenpress helper)
    where: str  # file:line of the innermost frame outside torch
    function: str = ""  # that frame's function (``pack_index``: a size read, see TokenState.keep's counts)


_TORCH_DIR = Path(torch.__file__).resolve().parent
# Frames of the hook machinery call the method but are not its code.
_PLUGGY_DIR = Path(pluggy.__file__).resolve().parent
_CORE_DIR = Path(tokenpress.__file__).resolve().parent
_TESTING_DIR = Path(__file__).resolve().parent


def _blamed_frame(stack: SequenceOf[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame of ``stack`` outside torch, pluggy, warnings and this kit."""
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if (path.is_relative_to(_TESTING_DIR) or path.is_relative_to(_TORCH_DIR) or path.is_relative_to(_PLUGGY_DIR)
                or str(path) == str(Path(warnings.__file__).resolve()) or frame.filename.startswith("<")):
            continue
        return frame
    return None


def sync_origin(stack: SequenceOf[traceback.FrameSummary]) -> tuple[str, str]:
    """Classify a synchronisation by the innermost frame of ``stack`` outside torch (and this kit).

    Returns ``("core", where)`` when that frame is in the tokenpress package, else ``("method", where)``.
    """
    frame = _blamed_frame(stack)
    if frame is None:
        return "core", "<unknown>"
    origin = "core" if Path(frame.filename).resolve().is_relative_to(_CORE_DIR) else "method"
    return origin, f"{frame.filename}:{frame.lineno}"


def _event(message: str) -> SyncEvent:
    stack = traceback.extract_stack()[:-1]
    origin, where = sync_origin(stack)
    frame = _blamed_frame(stack)
    return SyncEvent(message, origin, where, frame.name if frame is not None else "")


class SyncRecorder:
    """Within the block, record every synchronising CUDA operation (``torch.cuda.set_sync_debug_mode``)."""

    # torch warns once per process that the debug mode is a prototype; that notice is no synchronisation.
    NOTICE = "Synchronization debug mode is a prototype feature"

    def __init__(self) -> None:
        self.events: list[SyncEvent] = []
        self._stack = contextlib.ExitStack()
        self._previous = 0

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        text = str(message)
        if "synchroniz" in text and not text.startswith(self.NOTICE):
            self.events.append(_event(text))
        else:
            self._original(message, category, filename, lineno, file, line)

    def __enter__(self) -> SyncRecorder:
        self._original = warnings.showwarning
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        self._previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.set_sync_debug_mode(self._previous)
        self._stack.close()


#: Operations that make CUDA wait for the device: a value read on the host, or an output size read from values.
_VALUE_READS = frozenset({
    "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.argwhere.default",
    "aten.masked_select.default", "aten.unique_consecutive.default", "aten._unique2.default",
    "aten.unique_dim.default", "aten.bincount.default", "aten.equal.default",
})
_INDEXING = frozenset({"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                       "aten._index_put_impl_.default"})


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


class DataDependentOps(TorchDispatchMode):
    """Within the block, record every operation that synchronises when run on CUDA, on any device.

    ``Tensor.tolist`` and ``Tensor.numpy`` do not reach the dispatcher on a CPU tensor; they are
    wrapped for the block's duration (and restored on exit).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[SyncEvent] = []
        self._saved: dict[str, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if (name in _VALUE_READS or (name in _INDEXING and _has_mask_index(args))
                or (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None)):
            self.events.append(_event(f"{name} (synchronises on CUDA)"))
        return func(*args, **kwargs)

    def _wrap(self, attribute: str) -> None:
        original = getattr(torch.Tensor, attribute)
        recorder = self

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            recorder.events.append(_event(f"Tensor.{attribute}() (a device-to-host copy on CUDA)"))
            return original(tensor, *args, **kwargs)

        self._saved[attribute] = original
        setattr(torch.Tensor, attribute, read)

    def __enter__(self) -> DataDependentOps:
        for attribute in ("tolist", "numpy"):
            self._wrap(attribute)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for attribute, original in self._saved.items():
                setattr(torch.Tensor, attribute, original)
            self._saved.clear()


@contextlib.contextmanager
def recording_syncs(device: torch.device | str) -> Iterator[list[SyncEvent]]:
    """``with recording_syncs(device) as events:`` - the real CUDA synchronisations on a GPU, the
    operations that would synchronise there (:class:`DataDependentOps`) elsewhere."""
    recorder: SyncRecorder | DataDependentOps = (SyncRecorder() if torch.device(device).type == "cuda"
                                                 else DataDependentOps())
    with recorder:
        yield recorder.events

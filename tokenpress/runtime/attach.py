"""Attaching a stack to one model instance, and taking it off again exactly.

```python
with tokenpress.compress(model, "stacks/fastv.yaml") as handle:
    out = model.generate(**inputs, max_new_tokens=20)
    print(handle.report())
```

Only the instance is touched: the inner module gets instance attributes ``forward`` and
``get_image_features``/``get_video_features`` (which, inside ``generate``, defer the encoding to the
compressed prefill), and the model an instance attribute ``generate`` (which records the prompt length
so that selections are made from the prompt alone). Detaching deletes them (or restores what was there
before). Everything that can be wrong with the stack or the model is checked before anything is touched.

**Threads.** Nothing is replaced during a forward: what one call needs (the prompt length, whether its
encoder call is deferred, the adapter's media, the prefill's outcome) lives in that call's thread, so
several threads may run ``generate`` or forward passes on one attached model at once, each getting
its single-thread answer. Attaching and detaching are not meant to race with running forwards.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
from torch import nn

from tokenpress.core import hookspecs, weights
from tokenpress.core.errors import CompressionError, PluginError, StackError, TokenpressError, UnsupportedModelError
from tokenpress.core.method import Method
from tokenpress.core.registry import Registry, get_registry
from tokenpress.core.signals import as_requests
from tokenpress.core.stack import Stack, load_stack
from tokenpress.runtime import compat
from tokenpress.runtime.adapter import ModelAdapter
from tokenpress.runtime.interception import CompressedForward, DeferredEncoding
from tokenpress.runtime.prefill import PrefillOutcome, PrefillStats, StageEntry, StageRecord

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()
_MISSING = object()


def find_adapter(model: nn.Module, registry: Registry | None = None) -> ModelAdapter:
    """The adapter of the most recently registered family that supports ``model``."""
    registry = registry or get_registry()
    for adapter_class in reversed(registry.adapters):  # adapters registered later (plugins) take precedence
        if adapter_class.supports(model):
            return adapter_class(model)
    families = ", ".join(a.family for a in registry.adapters) or "none"
    raise UnsupportedModelError(
        f"no tokenpress adapter supports {type(model).__name__} "
        f"(model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}); supported families: {families}"
    )


@dataclass
class Report:
    """Per-stage token counts of the last compressed prefill (visual tokens, per sample)."""

    stack: str
    records: list[StageRecord]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [record.as_dict() for record in self.records]

    def __str__(self) -> str:
        if not self.records:
            return f"stack {self.stack!r}: no compressed prefill yet (or no stage)"
        header = f"{'stage':<34} {'action':<9} {'tokens in':>14} {'tokens out':>14}"
        lines = [f"stack {self.stack!r}", header, "-" * len(header)]
        for record in self.records:
            where = record.stage + (f" layer {record.layer}" if record.layer is not None else "")
            lines.append(f"{where:<34} {record.action:<9} {_counts(record.tokens_in):>14} "
                         f"{_counts(record.tokens_out):>14}")
        return "\n".join(lines)


def _counts(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


class Handle:
    """A stack attached to one model instance. Use as a context manager or call :meth:`detach`."""

    def __init__(self, model: nn.Module, stack: Stack, adapter: ModelAdapter, entries: list[StageEntry],
                 registry: Registry) -> None:
        self.model = model
        self.stack = stack
        self.adapter = adapter
        self.entries = entries
        self.registry = registry
        #: Set to a list to record, at the next prefills, which original patches each stage (and each
        #: decoder layer with a stage) still represents: ``(label, (images, patches) bool)`` pairs.
        self.trace: list[tuple[str, Any]] | None = None
        self.trace_grids: Any = None  # (images, 3) original (t, h, w) grids of the traced prefill
        self.attached = False
        self._saved: dict[tuple[int, str], Any] = {}
        self._last: PrefillOutcome | None = None  # the last prefill of any thread
        self._thread = threading.local()  # per thread: its last outcome, its generate's prompt length

    # --- per-thread state -------------------------------------------------------------------------

    @property
    def outcome(self) -> PrefillOutcome | None:
        """What the last compressed prefill of this thread did (of any thread, in a thread that ran none;
        None before the first)."""
        return getattr(self._thread, "outcome", None) or self._last

    @property
    def prompt_length(self) -> int | None:
        """The prompt length of the ``generate`` call running in this thread (None outside one)."""
        return getattr(self._thread, "prompt_length", None)

    @property
    def deferring(self) -> bool:
        """Whether this thread is inside an attached ``generate``, whose encoder calls the prefill makes."""
        return getattr(self._thread, "deferring", False)

    # --- attach / detach ------------------------------------------------------------------------

    def _set(self, target: nn.Module, name: str, value: Any) -> None:
        self._saved[(id(target), name)] = (target, target.__dict__.get(name, _MISSING))
        setattr(target, name, value)

    def _attach(self) -> None:
        inner = self.adapter.inner_module()
        forward = CompressedForward(self, inner.forward)
        self._set(inner, "forward", forward)
        # transformers' generate() runs the vision encoder itself before the prefill (through the
        # inner module's get_*_features) and passes the result as `mm_encoder_outputs`. The
        # post_encoder stages need the raw encoder (and its signals), so in a thread inside an attached
        # generate() those calls only record their arguments and the compressed prefill encodes.
        if self.entries:
            for name in ("get_image_features", "get_video_features"):
                encoder = getattr(inner, name, None)
                if encoder is not None:
                    self._set(inner, name, _deferring(encoder, self))
        self._set(self.model, "generate", self._wrap_generate(self.model.generate))
        _ATTACHED[self.model] = self
        self.attached = True

    def _wrap_generate(self, generate: Any) -> Any:
        @functools.wraps(generate)
        def generate_with_prompt(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            config = kwargs.get("generation_config")
            for option in ("num_beams", "num_return_sequences"):
                value = kwargs.get(option, getattr(config, option, None) if config is not None else None)
                value = value if value is not None else getattr(self.model.generation_config, option, 1)
                if self.entries and (value or 1) > 1:
                    raise CompressionError(f"generate({option}={value}) is not supported while a compression stack "
                                           "is attached (greedy or sampled single sequences are)")
            local = self._thread
            outer = (getattr(local, "prompt_length", None), getattr(local, "deferring", False))
            local.prompt_length = input_ids.shape[1] if input_ids is not None else None
            local.deferring = True
            try:
                return generate(*args, **kwargs)
            finally:
                local.prompt_length, local.deferring = outer

        return generate_with_prompt

    def _restore(self) -> None:
        for (_, name), (target, previous) in self._saved.items():
            if previous is _MISSING:
                target.__dict__.pop(name, None)
            else:
                target.__dict__[name] = previous
        self._saved.clear()

    def detach(self) -> None:
        """Restore the model exactly: same modules, same forward and generate attributes."""
        if not self.attached:
            return
        self._restore()
        for entry in self.entries:
            entry.method.teardown()
        _ATTACHED.pop(self.model, None)
        self.attached = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The unmodified model inside the block, the stack and its methods' state (weights being
        fitted) kept for after it: what ``tokenpress fit`` runs its teacher passes in."""
        if not self.attached:
            raise CompressionError("suspended() needs an attached stack")
        self._restore()
        try:
            yield
        finally:
            self._attach()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # --- reporting ------------------------------------------------------------------------------

    def store(self, outcome: PrefillOutcome) -> None:
        """Keep a prefill's outcome (the compressed forward calls this after each prefill), for this thread
        and as the handle's last."""
        self._thread.outcome = outcome
        self._last = outcome
        if self.trace is not None and outcome.trace is not None:
            self.trace.extend(outcome.trace)
            self.trace_grids = outcome.trace_grids

    @property
    def records(self) -> list[StageRecord]:
        """What each stage did at this thread's last compressed prefill."""
        return self.outcome.records if self.outcome is not None else []

    @property
    def prefill_stats(self) -> PrefillStats | None:
        """Token counts of the last compressed prefill (what the FLOPs model's measured mode reads)."""
        return self.outcome.stats if self.outcome is not None else None

    def report(self) -> Report:
        """What each stage did at this thread's last compressed prefill."""
        return Report(self.stack.name, list(self.records))


def _deferring(encoder: Any, handle: Handle) -> Any:
    """``get_*_features`` with the same signature, deferring the encoding in a thread inside the attached
    ``generate`` (the compressed prefill encodes), encoding as usual elsewhere."""

    @functools.wraps(encoder)
    def maybe_record(*args: Any, **kwargs: Any) -> Any:
        if handle.deferring:
            return DeferredEncoding(encoder, args, kwargs)
        return encoder(*args, **kwargs)

    return maybe_record


def check_stack(stack: Stack, adapter: ModelAdapter) -> list[Method]:
    """Everything :func:`compress` checks before it touches the model, without touching it.

    The attention implementation, the stages' layers against the decoder's depth, the transformers
    features the adapter relies on, each stage's hook signatures and the encoder signals it asks
    for. Returns the stages' method instances (not set up). ``tokenpress validate --model`` runs this.
    """
    stack = stack.resolved(adapter.num_layers, adapter.feature_blocks(), adapter.num_encoder_layers() or None)
    _validate(stack, adapter)
    adapter.check_transformers_features()
    # Each stage object is registered in a plugin manager of its own so that pluggy checks its hook
    # signatures against the specs; the core then calls the stages itself, in stack order.
    checker = pluggy.PluginManager(hookspecs.PROJECT)
    checker.add_hookspecs(hookspecs)
    methods = []
    for stage in stack.stages:
        method = stage.method_class(stage.config, stage.layers)
        try:
            checker.register(method, name=f"stage-{stage.index}")
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"method {stage.method!r}: {exc}") from None
        try:
            requests = as_requests(method.required_signals())
        except (TypeError, ValueError) as exc:
            raise PluginError(f"{stack.source}: stages[{stage.index}] ({stage.method}): {exc}") from None
        for request in requests:
            problem = adapter.check_signal(request)
            if problem:
                raise UnsupportedModelError(f"{stack.source}: stages[{stage.index}] ({stage.method}): {problem}")
            _check_signal_after_merges(stack, stage, request, adapter)
        methods.append(method)
    return methods


def _check_signal_after_merges(stack: Stack, stage: Any, request: Any, adapter: ModelAdapter) -> None:
    """A signal is laid out like the final tokens: it must be read after every block a stage changes."""
    layer = request.layer % max(adapter.num_encoder_layers(), 1)
    for other in stack.stages:
        late = [block for block in other.layers if other.inside_encoder and block >= layer]
        if late:
            raise StackError(f"{stack.source}: stages[{stage.index}] ({stage.method}) reads {request.name} in encoder "
                             f"layer {layer}, but stages[{other.index}] ({other.method}) changes the tokens inside "
                             f"encoder block {late[0]}; list only blocks before {layer} for it (signals are laid out "
                             "like the final tokens)")


def _validate(stack: Stack, adapter: ModelAdapter) -> None:
    implementation = adapter.attention_implementation
    if stack.stages and implementation not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(f"attention implementation {implementation!r} is not supported while "
                                    f"compressing; use one of {', '.join(SUPPORTED_ATTENTION)}")
    for stage in stack.stages:
        where = f"{stack.source}: stages[{stage.index}]"
        if stage.inside_encoder:
            if adapter.feature_blocks() is None:
                raise UnsupportedModelError(f"{where} ({stage.method}): {adapter.encoder_stages_refusal()}")
            problem = adapter.check_encoder_blocks(stage.layers)
            if problem:
                raise StackError(f"{where}.layers: {problem}")
            continue
        for layer in stage.layers:
            if layer >= adapter.num_layers:
                raise StackError(f"{where}.layers: layer {layer} is out of range for this model, which has "
                                 f"{adapter.num_layers} decoder layers (0-{adapter.num_layers - 1})")


def prepare_stages(stack: Stack, adapter: ModelAdapter) -> list[StageEntry]:
    """``stack``'s stages (layers resolved) checked against ``adapter``'s model, each with its method set up
    and its weights built (and loaded from the stage's file): what :func:`compress` attaches, and what a
    serving engine runs itself. Nothing stays set up when a stage is refused."""
    methods = check_stack(stack, adapter)
    ready: list[Method] = []
    try:
        for stage, method in zip(stack.stages, methods, strict=True):
            try:
                method.setup(adapter)
                ready.append(method)
                _build_weights(method, adapter)
            except TokenpressError as exc:  # say which stage: the method only knows its own parameters
                raise type(exc)(f"{stack.source}: stages[{stage.index}] ({stage.method}): {exc}") from None
    except BaseException:
        for method in ready:  # nothing of a refused stack stays behind
            method.teardown()
        raise
    return [StageEntry(stage, method) for stage, method in zip(stack.stages, methods, strict=True)]


def _build_weights(method: Method, adapter: ModelAdapter) -> None:
    module = method.build_weights(adapter)
    if module is None:
        return
    weights.follow(module, adapter.model)
    path = getattr(method.config, "weights", None)
    if path is not None:
        shaping = method.weights_shaping()
        weights.load(weights.resolve(path, method.name, shaping, adapter.model), method.name, shaping,
                     weights.model_signature(adapter, method), module, made_by=method.weights_made_by(),
                     partial=method.partial_weights)
    method.weights = module


def compress(model: nn.Module, stack: Stack | str | Path | dict, registry: Registry | None = None) -> Handle:
    """Attach ``stack`` to ``model`` (this instance only) and return the :class:`Handle`.

    Raises a :class:`~tokenpress.core.errors.TokenpressError` - with the model untouched - when the
    stack is invalid, names layers the model does not have, no adapter supports the model, or the
    installed transformers lacks a feature the adapter needs. Outside the transformers range
    tokenpress was tested on, warns (:class:`~tokenpress.runtime.compat.UntestedTransformersWarning`).
    """
    registry = registry or get_registry()
    stack = load_stack(stack, registry)
    if model in _ATTACHED:
        raise PluginError(f"a stack ({_ATTACHED[model].stack.name!r}) is already attached to this model; "
                          "detach it first")
    adapter = find_adapter(model, registry)
    compat.check_transformers()
    # stages that list no layers take their method's default (decoder layers, or encoder blocks)
    stack = stack.resolved(adapter.num_layers, adapter.feature_blocks(), adapter.num_encoder_layers() or None)
    entries = prepare_stages(stack, adapter)
    handle = Handle(model, stack, adapter, entries, registry)
    handle._attach()
    return handle


def attached_handle(model: nn.Module) -> Handle | None:
    """The handle of the stack attached to ``model``, if any."""
    return _ATTACHED.get(model)

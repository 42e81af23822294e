"""The profiling contract as a pytest test kit: every method plugin, built-in or third-party, runs it.

A plugin author subclasses :class:`MethodContract` in a test file and names the method::

    from tokenpress.testing import MethodContract

    class TestAcmeKeepFirst(MethodContract):
        method = "acme-keepfirst"          # a registered method name
        params = {"keep_ratio": 0.5}       # optional: defaults to the method's example_params

pytest then runs one test per check, for every tiny model family of
:data:`tokenpress.testing.families.FAMILIES` (and every method, when ``method`` names several). A
family whose model cannot serve the stage (attaching raises ``UnsupportedModelError``: an encoder
signal it does not give, say) is skipped with the reason; ``families = ("llava",)`` limits the run.

Each check is a ``test_*`` method of :class:`MethodContract`; its docstring says what it checks (the
documentation's page on the kit lists them from this class). The class attributes tune the run: the
stage's ``point``, ``layers`` (default: the method's own default layers), ``positions``, stages placed
around it (``stages_before``/``stages_after``), tolerances.

Every measurement goes through :class:`StageObserver`, a ``tokenpress_run_stage`` hook wrapper, so
only the method's own hook calls are measured. Tiny models are built once per session
(:func:`tiny_model`).
"""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy
import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import tokenpress
from tokenpress.core import flops
from tokenpress.core import weights as weights_io
from tokenpress.core.decisions import Merge
from tokenpress.core.hookspecs import hookimpl
from tokenpress.core.method import Method
from tokenpress.core.tokens import TokenState
from tokenpress.families.testbed import session_model
from tokenpress.measure.profiling import observing
from tokenpress.runtime import compat
from tokenpress.runtime.attach import check_stack, find_adapter
from tokenpress.runtime.context import DecoderContext
from tokenpress.testing.families import FAMILIES, Family, ScaledInputs, prompts
from tokenpress.testing.memory import AllocationTracker, growth_exponent
from tokenpress.testing.syncs import SyncEvent, SyncRecorder, recording_syncs, sync_origin

__all__ = [
    "SCALED_INPUTS",
    "FamilyCase",
    "FloatAllocationTracker",
    "MethodContract",
    "StageCall",
    "StageObserver",
    "SyncEvent",
    "SyncRecorder",
    "observe",
    "sync_origin",
    "tiny_model",
]

# --- tiny models, built once per session --------------------------------------------------------

def tiny_model(family: str, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> Any:
    """The session's tiny model of ``family`` (shared: attach stacks with ``with``, never modify it)."""
    return session_model(FAMILIES[family], attn_implementation, dtype, device)


@dataclass(frozen=True)
class FamilyCase:
    """A family under test: its :class:`~tokenpress.testing.families.Family` and the session's model."""

    name: str
    family: Family
    model: Any

    def batch(self, count: int = 3, padding_side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
        """``count`` prompts of different lengths, one image each, padded on ``padding_side``."""
        return self.family.batch(self.model, prompts(count, seed), padding_side, seed)

    def select(self, batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` of ``batch``, unpadded, as a batch of one."""
        return self.family.select(batch, index)


# --- inputs with a growing number of visual tokens (for the N x N check) -------------------------

#: Family name -> inputs at three growing visual token counts: each family's own (``Family.scaled``), and
#: what a third-party family adds here (an entry here wins over its record's).
SCALED_INPUTS: dict[str, ScaledInputs] = {name: family.scaled for name, family in FAMILIES.items()
                                          if family.scaled is not None}

# --- observing the method's own hook calls ------------------------------------------------------


class FloatAllocationTracker(AllocationTracker):
    """An :class:`~tokenpress.testing.memory.AllocationTracker` that also follows floating-point memory apart.

    Attention and similarity matrices are floating point; the core's own boolean/integer bookkeeping
    (for instance ``TokenState.source``, images x tokens x original patches) is not what the N x N
    check is about. ``float_bytes`` is the **peak** of the float memory created inside the tracker and
    still alive: a method that computes attention over all visual tokens chunk by chunk (quadratic
    work, as ALVTS's visual-to-visual score must) holds one chunk at a time and stays linear, while
    one that materialises an N x N matrix does not. ``total_float_bytes`` sums every float allocation.
    """

    def __init__(self, keep: int = 5) -> None:
        super().__init__()
        self.float_bytes = 0
        self.total_float_bytes = 0
        self.live_bytes = 0
        self.keep = keep
        self.largest: list[tuple[int, str, tuple[int, ...], torch.dtype]] = []  # bytes, op, shape, dtype
        self._storages: dict[int, list[int]] = {}  # storage pointer -> [bytes, tracked tensors alive]

    def _release(self, pointer: int) -> None:
        entry = self._storages.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[pointer]

    def _follow(self, tensor: torch.Tensor, pointer: int) -> None:
        self._storages[pointer][1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.numel()}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or not tensor.numel() or not tensor.is_floating_point():
                continue
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in inputs:
                if pointer in self._storages:  # a view of memory made in here keeps it alive
                    self._follow(tensor, pointer)
                continue
            size = tensor.untyped_storage().nbytes()
            self._storages[pointer] = [size, 0]
            self._follow(tensor, pointer)
            self.live_bytes += size
            self.total_float_bytes += size
            self.float_bytes = max(self.float_bytes, self.live_bytes)
            self.largest.append((size, str(func), tuple(tensor.shape), tensor.dtype))
            self.largest = sorted(self.largest, key=lambda item: -item[0])[: self.keep]
        return out


@dataclass
class StageCall:
    """One call of the observed method's hook, as seen from around it."""

    label: str
    point: str
    layer: int | None
    tokens_in: list[int]  # per image row (pre-LLM points) or per sample (decoder_layer)
    tokens_out: list[int]
    samples: list[int]  # the batch row each entry of tokens_in belongs to
    dtype_in: torch.dtype | None  # embeddings the stage received (None at decoder_layer)
    dtype_out: torch.dtype | None  # embeddings the stage returned
    devices: set[str] = field(default_factory=set)  # devices of every tensor the stage returned
    result_type: str = ""
    float_bytes: int = 0
    largest: list[tuple[int, str, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    syncs: list[SyncEvent] = field(default_factory=list)
    grids_in: list[tuple[int, int, int]] = field(default_factory=list)  # per image row (pre-LLM points)
    grids_out: list[tuple[int, int, int]] = field(default_factory=list)
    block: int | None = None  # the encoder block of a call inside the encoder (its rows: encoder runs)


def _device_of(payload: Any) -> torch.device:
    """The device a stage runs on: its token embeddings' (pre-LLM) or its sequence's (decoder layer)."""
    return payload.sequence.hidden.device if isinstance(payload, DecoderContext) else payload.embeddings.device


def _describe(stage: Any, point: str, payload: Any, result: Any, layer: int | None = None) -> StageCall:
    call = _describe_call(stage, point, payload, result)
    if not isinstance(payload, DecoderContext):
        call.block = layer
    return call


def _describe_call(stage: Any, point: str, payload: Any, result: Any) -> StageCall:
    label = stage.label()
    if isinstance(payload, DecoderContext):
        visual = payload.is_visual
        tokens_in = visual.sum(-1).tolist()
        devices = set()
        if result is None:
            tokens_out = list(tokens_in)
        elif isinstance(result, Merge):  # kept tokens, and one token per group that has members
            members = visual & (result.group >= 0)
            joined = torch.zeros(visual.shape[0], result.groups + 1, dtype=torch.bool, device=visual.device)
            joined.scatter_(1, torch.where(members, result.group, result.groups), members)
            tokens_out = ((visual & (result.group == -1)).sum(-1) + joined[:, :-1].sum(-1)).tolist()
            devices = {str(result.group.device)}
        else:
            mask = getattr(result, "mask", None)
            if isinstance(mask, torch.Tensor):
                tokens_out = (mask.bool() & visual).sum(-1).tolist()
                devices = {str(mask.device)}
            else:
                tokens_out = []
        return StageCall(label, point, payload.layer_index, tokens_in, tokens_out, list(range(len(tokens_in))),
                         None, None, devices, type(result).__name__)
    tokens_in = payload.counts().tolist() if isinstance(payload, TokenState) else []
    samples = payload.image_to_sample.tolist() if isinstance(payload, TokenState) else []
    dtype_in = payload.embeddings.dtype if isinstance(payload, TokenState) else None
    if not isinstance(result, TokenState):
        return StageCall(label, point, None, tokens_in, [], samples, dtype_in, None, set(), type(result).__name__)
    devices = {str(value.device) for value in vars(result).values() if isinstance(value, torch.Tensor)}
    grids_in = payload.grid_sizes() if isinstance(payload, TokenState) else []
    return StageCall(label, point, None, tokens_in, result.counts().tolist(), samples, dtype_in,
                     result.embeddings.dtype, devices, "TokenState", grids_in=grids_in, grids_out=result.grid_sizes())


class StageObserver:
    """An observer plugin (a ``tokenpress_run_stage`` wrapper) recording every call of one method's hooks.

    ``allocations=True`` measures what each call allocates (:class:`FloatAllocationTracker`);
    ``sync_debug=True`` records the host-device synchronisations it makes (CUDA). Register it with
    :func:`tokenpress.measure.profiling.observing` (``with observing(StageObserver("fastv")) as observer: ...``).
    """

    def __init__(self, method: str | None = None, *, allocations: bool = False, sync_debug: bool = False) -> None:
        self.method = method
        self.allocations = allocations
        self.sync_debug = sync_debug
        self.calls: list[StageCall] = []

    @hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage: Any, method: Method, point: str, payload: Any, call: Any,
                             layer: int | None) -> Any:
        if self.method is not None and stage.method != self.method:
            return (yield)
        tracker = FloatAllocationTracker() if self.allocations else None
        syncs = recording_syncs(_device_of(payload)) if self.sync_debug else contextlib.nullcontext([])
        with syncs as events, tracker or contextlib.nullcontext():
            result = yield
        described = _describe(stage, point, payload, result, layer)
        if tracker is not None:
            described.float_bytes = tracker.float_bytes
            described.largest = tracker.largest
        described.syncs = list(events)
        self.calls.append(described)
        return result


# --- helpers ------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    numpy.random.seed(seed)


def _to(batch: dict[str, torch.Tensor], device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``; floating tensors (pixels) in ``dtype`` when given."""
    return {key: value.to(device=device, dtype=dtype) if dtype is not None and value.is_floating_point()
            else value.to(device) for key, value in batch.items()}


def _counts(calls: list[StageCall]) -> str:
    """``stage: tokens in -> tokens out`` of each distinct call (``x n`` when repeated)."""
    seen: dict[str, int] = {}
    for call in calls:
        text = (call.label + (f" layer {call.layer}" if call.layer is not None else "")
                + f": {call.tokens_in} -> {call.tokens_out}")
        seen[text] = seen.get(text, 0) + 1
    return "; ".join(text + (f" (x {count})" if count > 1 else "") for text, count in seen.items()) or "(no call)"


def _allocations(largest: list[tuple[int, str, tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{op.split('.')[1] if op.count('.') else op} {list(shape)} {str(dtype).replace('torch.', '')} "
                     f"({size} B)" for size, op, shape, dtype in largest)


# --- the contract -------------------------------------------------------------------------------


class MethodContract:
    """The profiling contract, as a base class for a pytest test class (peft's common-tester style).

    Set ``method`` (a registered method name, or several) and optionally ``params``; the other class
    attributes tune the checks. The class itself is not collected (its name does not start with
    ``Test``); subclasses named ``Test...`` are.
    """

    #: Registered method name(s) under test.
    method: ClassVar[str | tuple[str, ...]] = ""
    #: Stage ``params`` of the compressing checks (``None``: each method's ``example_params``).
    params: ClassVar[dict[str, Any] | None] = None
    #: Insertion point (``None``: the method's default point).
    point: ClassVar[str | None] = None
    #: Layers of the stage: decoder layers of a ``decoder_layer`` stage (encoder blocks of one acting inside
    #: the encoder). ``None``: the method's ``default_layers`` for each tiny model where it has them, so the
    #: checks exercise them; else decoder layer 1.
    layers: ClassVar[tuple[int, ...] | None] = None
    #: ``positions`` of the stack under test (``"compact"`` checks the method with re-indexed positions).
    positions: ClassVar[str] = "original"
    #: Stages placed before and after the method's stage in the stack under test (stack entries, as in a
    #: YAML file): checks the method inside a stack. Only the method's own calls are observed.
    stages_before: ClassVar[tuple[dict[str, Any], ...]] = ()
    stages_after: ClassVar[tuple[dict[str, Any], ...]] = ()
    #: How far torch's FLOP counter may count above the FLOPs model (relative; ``None``: the family's own
    #: ``Family.flops_tolerance``, 0 for exact families and 0.05 for LLaVA-NeXT).
    flops_tolerance: ClassVar[float | None] = None
    #: Families to run on (``None``: every family of FAMILIES that a registered adapter handles).
    families: ClassVar[tuple[str, ...] | None] = None
    #: Tolerance of the identity and batch-invariance comparisons.
    atol: ClassVar[float] = 1e-5
    #: Largest growth exponent of the method's allocations against the visual token count.
    max_growth: ClassVar[float] = 1.5
    #: Global seed of the determinism check's first run (its second run seeds the global generators with
    #: ``seed + 1000``: a method must not draw from them).
    seed: ClassVar[int] = 0
    #: Tolerate synchronisations made inside tokenpress's own helpers (the core makes none in a stage call).
    allow_core_syncs: ClassVar[bool] = False
    #: New tokens of the generation check.
    max_new_tokens: ClassVar[int] = 6

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__.startswith("Test") and not cls.method:
            raise TypeError(f"{cls.__name__}: set `method = \"<registered method name>\"` to run the tokenpress "
                            "method contract")

    # --- parametrization ------------------------------------------------------------------------

    @classmethod
    def method_names(cls) -> list[str]:
        return [cls.method] if isinstance(cls.method, str) else list(cls.method)

    @classmethod
    def family_names(cls) -> list[str]:
        if cls.families is not None:
            return list(cls.families)
        handled = {adapter.family for adapter in tokenpress.get_registry().adapters}
        return [name for name in FAMILIES if name in handled]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize every check over the families and the method(s) under test."""
        if "contract_family" in metafunc.fixturenames:
            metafunc.parametrize("contract_family", self.family_names(), scope="class")
        if "contract_method" in metafunc.fixturenames:
            metafunc.parametrize("contract_method", self.method_names(), scope="class")

    # --- building blocks (override to adapt) ----------------------------------------------------

    def method_class(self, name: str) -> type[Method]:
        registry = tokenpress.get_registry()
        if name not in registry.methods:
            pytest.fail(f"method {name!r} is not registered (registered: {', '.join(sorted(registry.methods))}); "
                        "is its plugin installed, with a 'tokenpress.plugins' entry point?", pytrace=False)
        return registry.methods[name]

    def stack(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The stack under test: method ``name``'s stage with ``params`` (default: the class's, else
        example), between :attr:`stages_before` and :attr:`stages_after`, with :attr:`positions`."""
        method_class = self.method_class(name)
        if params is None:
            params = self.params if self.params is not None else method_class.example_params
        point = self.point or method_class.default_point()
        stage: dict[str, Any] = {"method": name, "at": point, "params": dict(params)}
        takes_layers = point == "decoder_layer" or (point == "post_encoder" and method_class.encoder_blocks)
        if self.layers is not None and takes_layers:
            stage["layers"] = list(self.layers)
        elif point == "decoder_layer" and not method_class.has_default_layers():
            stage["layers"] = [1]
        stages = [*map(dict, self.stages_before), stage, *map(dict, self.stages_after)]
        return {"name": f"contract-{name}", "positions": self.positions, "stages": stages}

    def stage_index(self) -> int:
        """Where the method's stage sits in :meth:`stack`."""
        return len(self.stages_before)

    def stage_method(self, handle: Any) -> Method:
        """The method instance of the stage under test in an attached ``handle``."""
        return handle.entries[self.stage_index()].method

    def case(self, family: str, dtype: torch.dtype | None = None, device: str = "cpu") -> FamilyCase:
        return FamilyCase(family, FAMILIES[family], tiny_model(family, dtype=dtype, device=device))

    @staticmethod
    def _ran(observer: StageObserver, name: str) -> None:
        assert observer.calls, f"the {name} stage never ran: the check would prove nothing"

    @pytest.fixture(autouse=True)
    def _only_families_that_can_run_the_method(self, request: pytest.FixtureRequest) -> None:
        """Skip (not fail) a family whose model cannot give what the stage needs (an encoder signal,
        say): attaching would refuse it with an UnsupportedModelError, before any forward pass."""
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        family, method = params.get("contract_family"), params.get("contract_method")
        if family is None or method is None or method not in tokenpress.get_registry().methods:
            return

        try:
            check_stack(tokenpress.load_stack(self.stack(method)), find_adapter(tiny_model(family)))
        except tokenpress.UnsupportedModelError as exc:
            pytest.skip(f"{method} cannot run on {family}: {exc}")

    def _observed_mixed_batch(self, family: str, name: str) -> tuple[StageObserver, list[Any], Method]:
        """One compressed forward of three prompts (images of different sizes where the family has
        them): the method's observed calls, the handle's stage records, and the stage's method."""
        case = self.case(family)
        spec = case.family
        batch = spec.mixed_batch(case.model, prompts(3)) if spec.mixed_batch else case.batch(3, "left", 0)
        with observing(StageObserver(name)) as observer, tokenpress.compress(case.model, self.stack(name)) as handle:
            case.model(**batch)
            records = handle.report().records
            method = self.stage_method(handle)
        self._ran(observer, name)
        return observer, records, method

    # --- the checks -----------------------------------------------------------------------------

    @torch.no_grad()
    def test_tokens_match_promise(self, contract_family: str, contract_method: str) -> None:
        """Tokens out == ``promised_count(tokens in)`` for every image (every sample at decoder layers)."""
        observer, records, method = self._observed_mixed_batch(contract_family, contract_method)
        if method.promised_count(torch.tensor(observer.calls[0].tokens_in or [1])) is None:
            pytest.skip(f"{contract_method} makes no promise on its token count (promised_count returns None)")
        problems = []
        def promise(counts: list[int], layer: int | None) -> list[int]:
            counts_in = torch.tensor(counts)
            return (method.promised_count(counts_in) if layer is None
                    else method.promised_count_at(counts_in, layer)).tolist()

        for call in observer.calls:
            where = call.label + (f" layer {call.layer}" if call.layer is not None else "") + (
                f" block {call.block}" if call.block is not None else "")
            promised = promise(call.tokens_in, call.block if call.block is not None else call.layer)
            if promised != call.tokens_out:
                unit = "sample" if call.layer is not None else "image"
                problems.append(f"{where}: tokens in per {unit} {call.tokens_in}, promised {promised}, "
                                f"kept {call.tokens_out}")
        by_stage = {(call.label, call.block): call for call in observer.calls if call.layer is None}
        for record in records:
            call = by_stage.get((record.stage, record.block))
            if record.layer is not None:
                expected = promise(record.tokens_in, record.layer)
            elif call is not None:
                promised = promise(call.tokens_in, call.block)
                expected = [sum(p for p, s in zip(promised, call.samples, strict=True) if s == sample)
                            for sample in range(len(record.tokens_in))]
            else:
                continue
            if record.tokens_out != expected:
                problems.append(f"report {record.stage}" + (f" layer {record.layer}" if record.layer is not None
                                                            else "")
                                + f": tokens in per sample {record.tokens_in}, promised {expected}, "
                                  f"reported {record.tokens_out}")
        assert not problems, (f"{contract_method} on {contract_family} does not keep what it promises "
                              f"(params {self.stack(contract_method)['stages'][self.stage_index()]['params']}):\n  "
                              + "\n  ".join(problems))

    @torch.no_grad()
    def test_grid_matches_expected_grid(self, contract_family: str, contract_method: str) -> None:
        """A method that re-grids (``expected_grid`` is not None) turns every image row's grid into it."""
        observer, _, method = self._observed_mixed_batch(contract_family, contract_method)
        calls = [call for call in observer.calls if call.grids_in]
        if not calls or method.expected_grid(*calls[0].grids_in[0][1:]) is None:
            pytest.skip(f"{contract_method} does not re-grid (expected_grid returns None)")
        problems = []
        for call in calls:
            for row, ((frames, height, width), got) in enumerate(zip(call.grids_in, call.grids_out, strict=True)):
                expected = (frames, *method.expected_grid(height, width))
                if tuple(got) != expected:
                    problems.append(f"{call.label} image row {row}: {height}x{width} became {got[1]}x{got[2]}, "
                                    f"expected_grid says {expected[1]}x{expected[2]}")
        assert not problems, f"{contract_method} on {contract_family}:\n  " + "\n  ".join(problems)

    @torch.no_grad()
    def test_declared_flops_match_the_counter(self, contract_family: str, contract_method: str) -> None:
        """torch's FLOP counter over a compressed prefill equals the FLOPs model fed with that prefill's
        token counts and the method's declared ``scoring_flops``/``stage_flops``; a family that does work on
        padding slots may count more, within its ``flops_tolerance`` (LLaVA-NeXT: 5%)."""

        # eager attention: torch's counter does not see the CPU flash kernel SDPA picks
        case = FamilyCase(contract_family, FAMILIES[contract_family], tiny_model(contract_family, "eager"))
        if getattr(case.model.config, "model_type", None) not in flops.SIMULATED_FAMILIES:
            pytest.skip(f"the FLOPs model does not cover {contract_family}")
        batch = case.batch(1, "left", 0)
        with observing(StageObserver(contract_method)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method)) as handle:
            with FlopCounterMode(display=False) as counter:
                case.model(**batch, logits_to_keep=1, use_cache=False)
            declared = flops.measured_from_handle(handle, batch)
        self._ran(observer, contract_method)
        counted = compat.counted_flops(counter)
        where = (f"{contract_method} on {contract_family}: torch counts {counted:.6g} FLOPs, the FLOPs model with "
                 f"the method's declared costs {declared.total:.6g} ({declared})")
        tolerance = case.family.flops_tolerance if self.flops_tolerance is None else self.flops_tolerance
        if tolerance == 0:
            assert declared.total == pytest.approx(counted, rel=1e-9), where
        else:
            assert counted * (1 - tolerance) <= declared.total <= counted * (1 + 1e-9), (
                f"{where}; allowed: up to {tolerance:.0%} below the counter (flops_tolerance)")

    @torch.no_grad()
    def test_identity_at_ratio_one(self, contract_family: str, contract_method: str) -> None:
        """``identity_params`` give the unmodified model's logits (inside a stack: the logits of the stack
        without the method's stage)."""
        identity = self.method_class(contract_method).identity_params
        if identity is None:
            pytest.skip(f"{contract_method} declares no identity setting (identity_params is None)")
        case = self.case(contract_family)
        batch = case.family.batch(case.model, [prompts(1)[0]] * 2, "left", 0)
        neighbours = self.stack(contract_method, identity)
        del neighbours["stages"][self.stage_index()]  # the stack around the method: its identity is that stack
        with tokenpress.compress(case.model, neighbours):
            expected = case.model(**batch).logits
        with observing(StageObserver(contract_method)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method, identity)):
            actual = case.model(**batch).logits
        self._ran(observer, contract_method)
        difference = float((actual - expected).abs().max())
        same = torch.allclose(actual, expected, rtol=self.atol, atol=self.atol)
        assert same, (
            f"{contract_method} with its identity_params {identity} changes the logits on {contract_family}: "
            f"max |difference| {difference:.3g} > {self.atol} (tokens {_counts(observer.calls)})")

    def test_autograd_on_gives_the_same_logits(self, contract_family: str, contract_method: str) -> None:
        """A prefill with autograd on (a user who did not write ``torch.no_grad()``, or one fine-tuning
        through the compressed model) runs, keeps its graph and gives the logits it gives under
        ``no_grad``: no ``out=`` or in-place write meets a tensor autograd needs."""
        case = self.case(contract_family)
        batch = case.batch(2, "left", 0)
        with observing(StageObserver(contract_method)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method)):
            with torch.no_grad():
                expected = case.model(**batch).logits
            actual = case.model(**batch).logits
        self._ran(observer, contract_method)
        assert actual.requires_grad, f"{contract_method} on {contract_family}: the logits lost their graph"
        difference = float((actual.detach() - expected).abs().max())
        assert torch.allclose(actual.detach(), expected, rtol=self.atol, atol=self.atol), (
            f"{contract_method} on {contract_family}: autograd on changes the logits, max |difference| "
            f"{difference:.3g} > {self.atol}")

    @torch.no_grad()
    def test_batch_invariance(self, contract_family: str, contract_method: str) -> None:
        """Each sample of a left-padded batch of 3 prompts gives its text logits as when run alone."""
        case = self.case(contract_family)
        batch = case.batch(3, "left", 1)
        placeholders = torch.tensor(tokenpress.find_adapter(case.model).placeholder_ids())
        problems = []
        with observing(StageObserver(contract_method)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method)) as handle:
            batched = case.model(**batch).logits
            kept_batched = [record.tokens_out for record in handle.report().records]
            for index in range(3):
                alone_batch = case.select(batch, index)
                alone = case.model(**alone_batch).logits[0]
                kept_alone = [record.tokens_out[0] for record in handle.report().records]
                real = batch["attention_mask"][index].bool()
                text = real & ~torch.isin(batch["input_ids"][index], placeholders)
                alone_text = ~torch.isin(alone_batch["input_ids"][0], placeholders)
                ours, theirs = batched[index][text], alone[alone_text]
                if not torch.allclose(ours, theirs, rtol=self.atol, atol=self.atol):
                    problems.append(f"sample {index}: max |difference| {float((ours - theirs).abs().max()):.3g}, "
                                    f"tokens kept batched {[k[index] for k in kept_batched]}, alone {kept_alone}")
        self._ran(observer, contract_method)
        assert not problems, (f"{contract_method} on {contract_family}: text logits in a padded batch differ from "
                              "the same sample run alone (a selection that depends on the batch?):\n  "
                              + "\n  ".join(problems))

    @torch.no_grad()
    def test_cache_and_no_cache_agree(self, contract_family: str, contract_method: str) -> None:
        """Greedy ``generate(use_cache=True)`` == ``generate(use_cache=False)`` on a padded batch of 3."""
        case = self.case(contract_family)
        batch = case.batch(3, "left", 2)
        options = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        with observing(StageObserver(contract_method)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method)):
            cached = case.model.generate(**batch, use_cache=True, **options)
            prefills = len(observer.calls)
            uncached = case.model.generate(**batch, use_cache=False, **options)
        self._ran(observer, contract_method)
        assert prefills, f"the {contract_method} stage never ran during generate(use_cache=True)"
        new = batch["input_ids"].shape[1]
        same = torch.equal(cached, uncached)
        assert same, (
            f"{contract_method} on {contract_family}: greedy generate with the KV cache gave {cached[:, new:].tolist()}"
            f", without it {uncached[:, new:].tolist()}; a stage must decide from the prompt alone, once per prompt "
            f"(tokens per call: {_counts(observer.calls)})")

    @torch.no_grad()
    def test_no_quadratic_allocations(self, contract_family: str, contract_method: str) -> None:
        """The peak float memory the hook calls hold grows ~linearly with the visual tokens (no N x N matrix)."""
        family = FAMILIES.get(contract_family)
        scaled = SCALED_INPUTS.get(contract_family, family.scaled if family is not None else None)
        if scaled is None:
            pytest.skip(f"no inputs of growing size for family {contract_family!r} (Family.scaled, or "
                        "tokenpress.testing.contract.SCALED_INPUTS)")
        sizes, allocated, largest = [], [], []
        pairwise = self.method_class(contract_method).pairwise_scores
        for step in range(3):
            model, batch = scaled(step)
            with observing(StageObserver(contract_method, allocations=True)) as observer, \
                    tokenpress.compress(model, self.stack(contract_method)) as handle:
                model(**batch)
                method = self.stage_method(handle)
            self._ran(observer, contract_method)
            sizes.append(max(max(call.tokens_in, default=0) for call in observer.calls))
            beyond = []
            for call in observer.calls:
                declared = [int(pairwise(method, n)) for n in call.tokens_in]
                too_many = [(n, d) for n, d in zip(call.tokens_in, declared, strict=True) if d > n * n]
                assert not too_many, (
                    f"{contract_method} declares {too_many[0][1]} pairwise scores for a row of {too_many[0][0]} tokens "
                    "(pairwise_scores): more than N x N is not a bounded pairwise algorithm")
                beyond.append(max(0, call.float_bytes - 4 * sum(declared)))  # float32 scores, one matrix per row
            allocated.append(sum(beyond))
            largest = sorted((item for call in observer.calls for item in call.largest), key=lambda i: -i[0])[:3]
        if len(set(sizes)) < 3:
            pytest.fail(f"the scaled inputs of {contract_family} gave visual token counts {sizes}, not three sizes",
                        pytrace=False)
        if max(allocated) == 0:
            return  # allocates nothing: constant
        exponent = growth_exponent(sizes, [max(value, 1) for value in allocated])
        declares = type(method).pairwise_scores is not Method.pairwise_scores
        held = "hold beyond its declared pairwise scores" if declares else "hold"
        assert exponent < self.max_growth, (
            f"{contract_method} on {contract_family}: the peak floating-point memory its hook calls {held} grows as "
            f"N^{exponent:.2f} with the visual token count N (limit N^{self.max_growth}): tokens {sizes} -> bytes "
            f"{allocated}; largest allocations at N={sizes[-1]}: {_allocations(largest)}. An N x N attention or "
            "similarity matrix? Score with context.scorer (rows on demand) or chunk it.")

    @torch.no_grad()
    def test_dtype_and_device_kept(self, contract_family: str, contract_method: str) -> None:
        """Under a float64 model the stage returns float64 tokens on the model's device; outputs stay float64."""
        dtype = torch.float64
        case = self.case(contract_family, dtype=dtype)
        device = next(case.model.parameters()).device
        batch = _to(case.batch(3, "left", 3), device, dtype)
        error: Exception | None = None
        logits = None
        with observing(StageObserver(contract_method)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method)):
            try:
                logits = case.model(**batch).logits
            except Exception as exc:  # reported below, after what the stage returned
                error = exc
        problems = []
        for call in observer.calls:
            if call.dtype_out is not None and call.dtype_out != dtype:
                problems.append(f"{call.label} returned {call.dtype_out} embeddings (received {call.dtype_in})")
            if call.devices - {str(device)}:
                problems.append(f"{call.label} returned tensors on {sorted(call.devices)}, the model is on {device}")
        assert not problems, (f"{contract_method} on {contract_family} with a {dtype} model:\n  "
                              + "\n  ".join(problems))
        if error is not None:
            raise AssertionError(f"{contract_method} on {contract_family}: the compressed forward of a {dtype} model "
                                 f"failed: {type(error).__name__}: {error}") from error
        self._ran(observer, contract_method)
        assert logits is not None and logits.dtype == dtype and logits.device == device, (
            f"{contract_method} on {contract_family}: logits are {logits.dtype} on {logits.device}, "
            f"the model is {dtype} on {device}")

    @torch.no_grad()
    def test_weights_round_trip_and_follow_the_model(self, contract_family: str, contract_method: str,
                                                     tmp_path: Path) -> None:
        """A method with weights: they stay out of the model's state_dict, a saved file gives the same
        logits, they follow ``model.to()`` made after attaching, and detaching drops them."""

        if "weights" not in self.method_class(contract_method).Config.model_fields:
            pytest.skip(f"{contract_method} has no weights (its Config is not a WeightedConfig)")
        case = self.case(contract_family)
        batch = case.batch(2, "left", 5)
        keys = list(case.model.state_dict())
        stack = self.stack(contract_method)
        with tokenpress.compress(case.model, stack) as handle:
            method = self.stage_method(handle)
            assert method.weights is not None, f"{contract_method}: a WeightedConfig but build_weights gave None"
            assert list(case.model.state_dict()) == keys, (
                f"{contract_method} on {contract_family}: its weights appear in the model's state_dict")
            with torch.no_grad():
                for parameter in method.weights.parameters():  # not the initial weights: a file must matter
                    parameter.add_(0.01 * torch.randn_like(parameter))
            expected = case.model(**batch).logits
            path = weights_io.save(tmp_path / "weights.safetensors", method.name, method.weights_shaping(),
                                   weights_io.model_signature(handle.adapter), method.weights)
            try:
                case.model.to(torch.float64)
                doubled = case.model(**_to(batch, dtype=torch.float64)).logits
                followed = {p.dtype for p in method.weights.parameters()}
            finally:
                case.model.to(torch.float32)
            assert doubled.dtype == torch.float64 and followed == {torch.float64}, (
                f"{contract_method} on {contract_family}: after model.to(float64) the logits are {doubled.dtype} "
                f"and its weights {sorted(map(str, followed))}")
            torch.testing.assert_close(doubled.float(), expected, rtol=1e-3, atol=1e-3, msg=(
                f"{contract_method} on {contract_family}: after model.to(float64) the logits changed"))
        assert method.weights is None, f"{contract_method}: detach left its weights (teardown)"
        params = {**stack["stages"][self.stage_index()]["params"], "weights": str(path)}
        with tokenpress.compress(case.model, self.stack(contract_method, params)):
            assert torch.equal(case.model(**batch).logits, expected), (
                f"{contract_method} on {contract_family}: logits from its saved weights differ from the original")

    @torch.no_grad()
    def test_deterministic_under_seed(self, contract_family: str, contract_method: str) -> None:
        """Two attachments select the same tokens and give the same logits whatever the global random state:
        the global generators (torch, numpy, random) are seeded differently before each, so a method that
        draws from them instead of its own seeded generator (``params.seed``) fails."""
        case = self.case(contract_family)
        batch = case.batch(3, "left", 4)
        runs = []
        for run in range(2):
            _seed_everything(self.seed + 1000 * run)
            with observing(StageObserver(contract_method)) as observer, \
                    tokenpress.compress(case.model, self.stack(contract_method)) as handle:
                handle.trace = []
                logits = case.model(**batch).logits
                runs.append((logits, [(label, mask.clone()) for label, mask in handle.trace],
                             handle.report().as_dicts()))
            self._ran(observer, contract_method)
        (first, first_trace, first_records), (second, second_trace, second_records) = runs
        assert first_records == second_records, (
            f"{contract_method} on {contract_family} depends on the global random state: token counts "
            f"{[r['tokens_out'] for r in first_records]} then {[r['tokens_out'] for r in second_records]}")
        changed = [label for (label, a), (_, b) in zip(first_trace, second_trace, strict=True) if not torch.equal(a, b)]
        assert not changed, (f"{contract_method} on {contract_family} is not deterministic: two runs selected "
                             f"different tokens at {changed} (draws from the global random generators, the clock, "
                             "the OS or a counter? use a generator seeded from params, e.g. "
                             "tokenpress.core.select.seeded_uniform)")
        same = torch.equal(first, second)
        assert same, (f"{contract_method} on {contract_family} is not deterministic: logits differ by "
                      f"{float((first - second).abs().max()):.3g} between two runs under different global seeds")

    @torch.no_grad()
    def test_no_host_device_sync(self, contract_family: str, contract_method: str) -> None:
        """The stage never makes the device wait for the host: on CUDA, no synchronisation; on a CPU,
        none of the operations that synchronise on CUDA (a value read, an output size read from values)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        case = self.case(contract_family, device=device)
        batch = _to(case.batch(3, "left", 5), device)
        with observing(StageObserver(contract_method, sync_debug=True)) as observer, \
                tokenpress.compress(case.model, self.stack(contract_method)) as handle:
            case.model(**batch)
            promises = self.stage_method(handle).promised_count(torch.tensor([16])) is not None
        self._ran(observer, contract_method)
        events = [event for call in observer.calls for event in call.syncs]
        # A method that makes no count promise (an adaptive one) may not know its output width: the
        # one read that sizes it (pack_index) is its due; every other read is blamed.
        blamed = [event for event in events
                  if (event.origin == "method" or not self.allow_core_syncs)
                  and not (event.function == "pack_index" and not promises)]
        hint = ("\n(a core helper read a size it was not given: pass the counts the method promises, "
                "`tokens.keep(mask, counts=...)` with `tokens.counts_on_host()`, or `pack_index(mask, width=...)`)"
                if any(event.function == "pack_index" for event in blamed) else "")
        assert not blamed, (f"{contract_method} on {contract_family} synchronises with the host inside its stage:\n  "
                            + "\n  ".join(f"{event.where}: {event.message}" for event in blamed) + hint)
        off_device = [call.label for call in observer.calls if call.devices - {str(batch['input_ids'].device)}]
        assert not off_device, f"{contract_method}: {off_device} returned tensors off {device}"


@contextlib.contextmanager
def observe(method: str | None = None, **options: Any) -> Iterator[StageObserver]:
    """``with observe("fastv", allocations=True) as observer: ...`` - a registered :class:`StageObserver`."""
    with observing(StageObserver(method, **options)) as observer:
        yield observer

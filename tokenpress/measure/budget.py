"""Stacks at an equal cost: for a method and a target prefill-FLOPs ratio, the setting of its keep knob
(``Method.params_for_keep``: a keep ratio, PyramidDrop's lambda, a pooling kernel...) whose FLOPs ratio on
the model at hand is closest to the target.

The FLOPs are the analytical model's (:func:`tokenpress.core.flops.measured`) fed with the token counts of a
real prefill of the stack on a calibration batch - the questions the comparison itself asks - so adaptive
methods and image-dependent layouts are costed as they run. The search is a bisection over the keep ratio
the knob is derived from (the FLOPs ratio grows with it); a knob with few settings (a pooling kernel) may not
reach the target, and then the closest setting is reported as such, never passed off as matched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from tokenpress.core import flops as flops_model
from tokenpress.core.errors import TokenpressError
from tokenpress.core.method import Method
from tokenpress.core.registry import get_registry
from tokenpress.core.stack import Stack, load_stack
from tokenpress.runtime.attach import compress, find_adapter

#: How close a matched FLOPs ratio is to its target (absolute), and the bisection's steps.
TOLERANCE = 0.01
STEPS = 24


@dataclass(frozen=True)
class Matched:
    """A method's stack at a FLOPs target: the parameters chosen, the keep ratio they came from, the FLOPs
    ratio measured, and whether it is within :data:`TOLERANCE` of the target."""

    method: str
    target: float
    stack: dict[str, Any]
    keep_ratio: float
    flops_ratio: float
    matched: bool

    @property
    def knob(self) -> str:
        """The chosen parameters (and decoder layers, where the stack lists them), as a short text."""
        stage = self.stack["stages"][0]
        text = ", ".join(f"{key}={_short(value)}" for key, value in stage.get("params", {}).items())
        return text + (f", layers {stage['layers']}" if stage.get("layers") else "")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def keep_params(method_class: type[Method], keep_ratio: float, num_layers: int | None = None) -> dict[str, Any] | None:
    """``method_class.params_for_keep(keep_ratio)``, given the model's depth where the method takes it."""
    if "num_layers" in inspect.signature(method_class.params_for_keep).parameters:
        return method_class.params_for_keep(keep_ratio, num_layers=num_layers)
    return method_class.params_for_keep(keep_ratio)


def method_stack(method: str, keep_ratio: float, num_layers: int | None = None, layer: int | None = None,
                 name: str | None = None) -> dict[str, Any] | None:
    """A one-stage stack of ``method`` keeping about ``keep_ratio`` (None: the method has no keep knob).
    A decoder stage acts before ``layer`` where one is given, else at its method's default layers; a method
    without them acts before layer 2 (1 on a decoder of two layers or fewer)."""
    method_class = get_registry().methods[method]
    params = keep_params(method_class, keep_ratio, num_layers)
    if params is None:
        return None
    stage: dict[str, Any] = {"method": method, "params": params}
    if method_class.default_point() == "decoder_layer":
        if layer is not None:
            stage["layers"] = [layer]
        elif not method_class.has_default_layers():
            stage["layers"] = [2 if (num_layers or 4) > 2 else 1]
    return {"name": name or f"{method} {keep_ratio:.0%}", "stages": [stage]}


def single_layer(method: str, params: dict[str, Any], num_layers: int) -> int | None:
    """The one decoder layer a stage of ``method`` with ``params`` and no listed layers acts before (None:
    it is no decoder stage, or it acts before several)."""
    method_class = get_registry().methods[method]
    if method_class.default_point() != "decoder_layer":
        return None
    if not method_class.has_default_layers():
        return 2 if num_layers > 2 else 1
    layers = method_class.default_layers(method_class.Config(**params), num_layers)
    return layers[0] if layers and len(layers) == 1 else None


def flops_ratio(model: Any, inputs: dict[str, torch.Tensor], stack: Stack | dict) -> float:
    """Analytical prefill FLOPs of ``stack`` on ``inputs`` over the unmodified model's, from one real prefill."""
    stack = load_stack(stack)
    with torch.no_grad(), compress(model, stack) as handle:
        model(**inputs, use_cache=False, logits_to_keep=1)
        stats, records = handle.prefill_stats, handle.report().records
    ours = flops_model.measured(model, inputs, stats, stack, records).total
    return ours / flops_model.measured(model, inputs, None).total


def match_flops(model: Any, inputs: dict[str, torch.Tensor], method: str, target: float,
                layer: int | None = None) -> Matched:
    """The setting of ``method``'s keep knob whose FLOPs ratio on ``inputs`` is closest to ``target``.

    A decoder method that acts before one layer acts before ``layer`` where one is given, else its default
    (FastV: K = 2 of 32 scaled to the depth); where no keep ratio there reaches the target, earlier layers
    are tried (as FastV's own FLOPs comparisons vary its K), and the stack says which one it chose."""
    if not 0.0 < target <= 1.0:
        raise TokenpressError(f"--match-flops {target}: a FLOPs ratio is in (0, 1]")
    num_layers = find_adapter(model).num_layers
    first = method_stack(method, 1.0, num_layers, layer)
    if first is None:
        raise TokenpressError(f"{method} has no keep knob (params_for_keep returns None): it cannot be matched to a "
                              "FLOPs budget")
    layers: list[int | None] = [layer]
    start = layer if layer is not None else single_layer(method, first["stages"][0]["params"], num_layers)
    if start is not None:
        layers = list(range(start, 0, -1))  # the asked (or default) layer first, then earlier ones
    best: Matched | None = None
    for at in layers:
        found = _bisect(model, inputs, method, target, num_layers, at)
        if best is None or abs(found.flops_ratio - target) < abs(best.flops_ratio - target):
            best = found
        if found.matched:
            return found
    assert best is not None
    return best


def _bisect(model: Any, inputs: dict[str, torch.Tensor], method: str, target: float, num_layers: int,
            layer: int | None) -> Matched:
    """Bisection over the keep ratio (the FLOPs ratio grows with it) at one decoder layer."""
    cache: dict[float, tuple[dict[str, Any], float]] = {}

    def cost(keep: float) -> tuple[dict[str, Any], float]:
        if keep not in cache:
            stack = method_stack(method, keep, num_layers, layer, name=f"{method} @ FLOPs {target:g}")
            assert stack is not None
            cache[keep] = (stack, flops_ratio(model, inputs, stack))
        return cache[keep]

    low, high = 1e-4, 1.0
    for _ in range(STEPS):
        middle = (low + high) / 2
        if cost(middle)[1] > target:
            high = middle
        else:
            low = middle
    keep = min(cache, key=lambda value: abs(cache[value][1] - target))
    stack, ratio = cache[keep]
    return Matched(method, target, stack, keep, ratio, abs(ratio - target) <= TOLERANCE)

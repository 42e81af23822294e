"""Encoder signals: what a stage asks the vision encoder for, besides its output features.

A method lists typed requests in :meth:`~tokenpress.Method.required_signals`; the model's adapter
computes each distinct request once per prefill, while the encoder runs, and every stage that asked
finds the value in ``context.signals[request]`` (and by name, ``context.signals["cls_attention"]``,
when the stack asks for that signal one way only). Values are laid out like the encoder's token
state: one row per image row of the :class:`~tokenpress.TokenState`, one entry per patch of its
original grid, in raster order (LLaVA-NeXT's high-resolution row: the tiles stitched and unpadded
exactly as its features are). A family that cannot compute a request refuses it, in one sentence,
when the stack is attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

__all__ = ["AttentionReceived", "ClsAttention", "EncoderKeys", "Signal", "as_requests", "keyed"]


@dataclass(frozen=True)
class Signal:
    """A request for one encoder signal. Requests are values: two equal ones are computed once."""

    name: ClassVar[str] = ""
    layer: int = -2  # encoder layer (block) it is read in; negative counts from the last

    def describe(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{self.name}({fields})"


@dataclass(frozen=True)
class ClsAttention(Signal):
    """(I, P) float: the attention the class token pays each patch inside encoder layer ``layer``,
    recomputed from the layer's own norm and q/k for the one CLS row (no N x N matrix).

    ``heads="mean"``: the layer's softmax per head, averaged over heads; ``heads="full"``: one head
    over the full width, ``softmax(q k^T / sqrt(C))`` (PruMerge's score). Families with a class
    token serve it (CLIP: LLaVA-1.5, LLaVA-NeXT's tiles; InternViT).

    ``class_free``: what an encoder without a class token (SigLIP, Qwen's ViTs) gives instead:
    ``"refuse"`` (attaching refuses, in one sentence), or ``"received"``: :class:`AttentionReceived` of the
    same layer and heads, the attention each patch receives - what the authors and the toolkits that host
    VisionZip, PruMerge and VisPruner use on such encoders. The value is found under this request.
    """

    name: ClassVar[str] = "cls_attention"
    heads: Literal["mean", "full"] = "mean"
    class_free: Literal["refuse", "received"] = "refuse"


@dataclass(frozen=True)
class EncoderKeys(Signal):
    """(I, P, C) float: each patch's key in encoder layer ``layer`` (the layer's norm and ``k_proj``),
    for similarity-based merging. ``heads="concat"``: all heads side by side (C = the encoder width);
    ``heads="mean"``: averaged over the heads (C = the head width), the metric ToMe and VisionZip use."""

    name: ClassVar[str] = "keys"
    heads: Literal["concat", "mean"] = "concat"


@dataclass(frozen=True)
class AttentionReceived(Signal):
    """(I, P) float: the attention each patch receives inside encoder layer ``layer``: the layer's softmax
    attention averaged over its queries (every token that attends, within the segment it attends in: an
    image, a tile, a video frame or a window) and over heads (``heads="mean"``; ``"full"``: one head over
    the full width). Each row sums to 1 over the segment's tokens. Computed a block of queries at a time
    (no N x N matrix beyond the encoder's own); every family can serve it."""

    name: ClassVar[str] = "attention_received"
    heads: Literal["mean", "full"] = "mean"


def served_request(request: Signal, has_class_token: bool) -> Signal:
    """The request a family computes for ``request``: a class-token attention asked with
    ``class_free="received"`` becomes :class:`AttentionReceived` on an encoder without a class token."""
    if isinstance(request, ClsAttention) and request.class_free == "received":
        if not has_class_token:
            return AttentionReceived(layer=request.layer, heads=request.heads)
        return ClsAttention(layer=request.layer, heads=request.heads)  # the same value as a plain request: once
    return request


#: Signal name -> request class, for stacks of methods written against the name: value API.
BY_NAME: dict[str, type[Signal]] = {cls.name: cls for cls in (ClsAttention, EncoderKeys, AttentionReceived)}


def keyed(computed: dict[Signal, Any]) -> dict[Any, Any]:
    """What ``context.signals`` holds: every value by its request, and by its name when the stack
    asked for that signal one way only."""
    names: dict[str, list[Signal]] = {}
    for request in computed:
        names.setdefault(request.name, []).append(request)
    return {**computed, **{name: computed[found[0]] for name, found in names.items() if len(found) == 1}}


def as_requests(requested: Any) -> list[Signal]:
    """A method's ``required_signals()`` as typed requests: a list of :class:`Signal`, or the older
    ``{"cls_attention": layer}`` form (the value is the layer)."""
    if isinstance(requested, dict):
        requests = []
        for name, layer in requested.items():
            if name not in BY_NAME:
                raise ValueError(f"unknown encoder signal {name!r} (known: {', '.join(sorted(BY_NAME))})")
            requests.append(BY_NAME[name](layer=layer))
        return requests
    requests = list(requested or [])
    for request in requests:
        if not isinstance(request, Signal):
            raise TypeError(f"required_signals() gave {request!r}, not a tokenpress.core.signals.Signal")
    return requests

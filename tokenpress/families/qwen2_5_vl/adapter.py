"""Qwen2.5-VL (``transformers.Qwen2_5_VLForConditionalGeneration``).

* Encoder: the window-attention ViT. Its patches come grouped in 2x2 merge units; tokenpress sees
  one token per merge unit (the four patch features side by side, 4C wide), laid out on the LLM's
  own grid (t, h/2, w/2) in raster order, so positions mean the same thing before and after the
  projector.
* ``projector``: the 2x2 patch merger (RMSNorm per patch, then the MLP over the unit).
* Signals, per merge unit as the features are: ``keys`` (its four patches' keys side by side) and
  ``attention_received`` (the mean over its four patches of the attention each receives, inside the
  segments the block attends in: its windows in a windowed block, the image or video frame in a
  full-attention block).
* Positions: 3-D M-RoPE. ``original``: a visual token keeps the (t, h, w) position
  ``get_rope_index`` gives it; text continues after ``max(h, w)`` of each image, as in the model.
  ``compact``: the kept tokens are numbered one after another on all three axes.

What the Qwen ViTs share (the 2x2 units, their signals) is written here once; Qwen3-VL's adapter builds
on it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import AttentionReceived, EncoderKeys, Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.qwen2_5_vl.costs import Qwen2_5_VLCosts
from tokenpress.runtime import compat
from tokenpress.runtime.adapter import ImageSpan, ModelAdapter, ProjectorMLP, summary_positions
from tokenpress.runtime.encoder import attention_received, captured_output, module_view

#: Queries per block when the attention received inside windows is computed over a whole frame.
RECEIVED_CHUNK = 256


class _GroupUnits(nn.Module):
    """Stands in for the merger while encoding: regroups patches into 2x2 units, no weights. Values
    captured per patch inside the encoder (``extra``, in the encoder's own patch order) are grouped
    the same way beside the features, so the model's own reordering of units carries them along (in
    the widest of their dtypes; :attr:`dtype` is the features' own)."""

    def __init__(self, unit: int) -> None:
        super().__init__()
        self.unit = unit
        self.extra: list[list[torch.Tensor]] = []  # per value: what was captured (the last capture is used)
        self.dtype: torch.dtype | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.dtype = hidden.dtype
        values = [hidden, *(captured[-1] for captured in self.extra)]
        dtype = functools.reduce(torch.promote_types, (value.dtype for value in values))
        hidden = torch.cat([value.to(dtype) for value in values], dim=-1)
        return hidden.reshape(-1, self.unit, hidden.shape[-1])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def received_by_patch(qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], segments: torch.Tensor,
                      frames: list[int], heads: int, scaling: float, mode: str = "mean") -> torch.Tensor:
    """(N,) float: the attention each patch receives inside a Qwen ViT block, from the block's own fused
    ``qkv`` output (N, 3C), its rotary tables (cos, sin) (N, d) and the segment boundaries ``segments`` it
    attends within (``cu_seqlens``), in the encoder's patch order. ``frames``: patches per image or video
    frame (in that order). Averaged over the heads (``mode="full"``: one head over the full width, scale
    C^-1/2) and over the queries of each patch's segment, so each segment sums to 1.

    A frame attended as a whole is one :func:`~tokenpress.runtime.encoder.attention_received` call; a frame cut
    into windows is computed over the whole frame with the other windows masked out, a block of queries at a
    time: its cost (2 n^2 C per frame of n patches) then depends on the frame's patch count only, whatever
    its windows, which is what the family's FLOPs model charges."""
    cos, sin = (table.float().unsqueeze(1) for table in rotary)  # (N, 1, d): one table for every head
    query, key, _ = qkv.float().unflatten(-1, (3, heads, -1)).unbind(1)  # (N, H, d) each
    query, key = (states * cos + _rotate_half(states) * sin for states in (query, key))
    if mode == "full":
        width = query.shape[1] * query.shape[2]
        query, key, scaling = query.reshape(-1, 1, width), key.reshape(-1, 1, width), width ** -0.5
    query, key = query.transpose(0, 1).unsqueeze(0), key.transpose(0, 1).unsqueeze(0)  # (1, H, N, d)
    edges = sorted({int(edge) for edge in segments.tolist()})
    received, start = [], 0
    for length in frames:
        end = start + length
        inner = [edge - start for edge in edges if start < edge < end]
        frame_query, frame_key = query[:, :, start:end], key[:, :, start:end]
        if not inner:
            received.append(attention_received(frame_query, frame_key, scaling)[0])
        else:
            received.append(_received_in_windows(frame_query, frame_key, scaling, inner))
        start = end
    return torch.cat(received)


def _received_in_windows(query: torch.Tensor, key: torch.Tensor, scaling: float, inner: list[int]) -> torch.Tensor:
    """(n,) the attention each of a frame's n patches receives inside its window (windows start at 0 and at
    each of ``inner``), averaged over its window's queries: a block of queries at a time over the whole
    frame, keys of other windows masked (memory: a block of rows x n, never n x n)."""
    length, device = query.shape[2], query.device
    window = torch.bucketize(torch.arange(length, device=device), torch.tensor(inner, device=device), right=True)
    total = torch.zeros(length, dtype=torch.float32, device=device)
    for first in range(0, length, RECEIVED_CHUNK):
        rows = slice(first, min(first + RECEIVED_CHUNK, length))
        count = rows.stop - rows.start
        bias = torch.where(window[rows, None] == window[None, :], 0.0, float("-inf")).view(1, 1, count, length)
        total += attention_received(query[:, :, rows], key, scaling, bias, chunk=RECEIVED_CHUNK)[0] * count
    return total / torch.bincount(window)[window]


@contextlib.contextmanager
def received_capture(attention: nn.Module, frames: list[int], mode: str = "mean") -> Iterator[list[torch.Tensor]]:
    """While the encoder runs: the attention each patch receives inside the Qwen ViT attention module
    ``attention`` (:func:`received_by_patch`, shape (N, 1), the encoder's patch order), made from the q and k
    its ``qkv`` projection computes (nothing projected twice), with the rotary tables and segments the
    block is called with; this thread's calls only (one model may serve several threads)."""
    outputs: list[torch.Tensor] = []
    thread = threading.get_ident()
    signature = inspect.signature(attention.forward)
    call: dict[str, Any] = {}

    def before(_module: nn.Module, args: Any, kwargs: Any) -> None:
        if threading.get_ident() == thread:
            bound = signature.bind_partial(*args, **kwargs).arguments
            call.update(rotary=bound["position_embeddings"], segments=bound["cu_seqlens"])

    def after(_module: nn.Module, _args: Any, qkv: torch.Tensor) -> None:
        if threading.get_ident() == thread and call:
            outputs.append(received_by_patch(qkv, call.pop("rotary"), call.pop("segments"), frames,
                                             attention.num_heads, attention.scaling, mode).unsqueeze(-1))

    handles = [attention.register_forward_pre_hook(before, with_kwargs=True),
               attention.qkv.register_forward_hook(after)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def split_rows(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``values`` (sum(counts), ...) as one row per count, padded with zeros to the longest: (rows, width, ...)."""
    width = max(counts, default=0)
    chunks = torch.split(values, counts)
    return torch.stack([torch.cat([chunk, chunk.new_zeros(width - chunk.shape[0], *chunk.shape[1:])])
                        for chunk in chunks])


class Qwen2_5_VLAdapter(ModelAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (images; videos go through pre-LLM points)."""

    family = "qwen2.5-vl"
    #: per merge unit, as the features are: its 2x2 patches' keys side by side; the mean of the attention they receive
    signals = ("keys", "attention_received")
    no_signals_because = "its windowed ViT has no class token, so no CLS attention"
    position_rank = 3
    cost_model = Qwen2_5_VLCosts
    test_family = "tokenpress.families.qwen2_5_vl.testbed:QWEN2_5_VL"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "qwen2_5_vl" and hasattr(model, "model")

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def num_encoder_layers(self) -> int:
        return len(self.visual.blocks)

    def placeholder_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def check_transformers_features(self) -> None:
        super().check_transformers_features()
        if "mrope_section" not in (getattr(self.text_config, "rope_parameters", None) or {}):
            raise UnsupportedModelError(
                f"this {type(self.model).__name__}'s text config has no rope_parameters['mrope_section'], which "
                "tokenpress needs "
                f"for M-RoPE (transformers {compat.transformers_version()}; tested: {compat.TESTED_TRANSFORMERS})")

    def encoder_stages_refusal(self) -> str:
        return ("Qwen2.5-VL's vision encoder attends within fixed windows of 2x2-patch units and its merger needs "
                "every unit whole, so tokens cannot change between its blocks; merge after the encoder instead")

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: Any = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        tokens_per_second = getattr(self.model.config.vision_config, "tokens_per_second", 1)
        intervals = []
        if inputs.get("pixel_values") is not None:
            intervals += [1.0] * len(inputs["image_grid_thw"])
        if inputs.get("pixel_values_videos") is not None:
            seconds = inputs.get("second_per_grid_ts")
            count = len(inputs["video_grid_thw"])
            seconds = [1.0] * count if seconds is None else [float(s) for s in seconds]
            intervals += [tokens_per_second * s for s in seconds]
        keyed = list(dict.fromkeys(requests))
        units, extras, grid_thw = [], {request: [] for request in keyed}, []
        for pixels, grid in self._media(inputs):
            _, grouped, found = self._encode_units(pixels, grid, keyed)
            units.append(grouped)
            grid_thw.append(grid)
            for request in keyed:
                extras[request].append(found[request])
        llm_grids = torch.cat(grid_thw).long()
        llm_grids[:, 1:] //= self.merge_size
        grids = [tuple(grid) for grid in llm_grids.tolist()]
        counts = [t * h * w for t, h, w in grids]
        tokens = TokenState.from_dense(split_rows(torch.cat(units), counts), grids)
        images = len(inputs["image_grid_thw"]) if inputs.get("pixel_values") is not None else 0
        self.media = {"time_interval": intervals, "is_video": [False] * images + [True] * (len(intervals) - images)}
        return tokens, {request: split_rows(torch.cat(values), counts) for request, values in extras.items()}

    @staticmethod
    def _media(inputs: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pixels, grid_thw) of the images, then of the videos, as the encoder takes them."""
        groups = []
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if inputs.get(pixels) is not None:
                groups.append((inputs[pixels], inputs[grid]))
        return groups

    def _encode_units(self, pixels: torch.Tensor, grid_thw: torch.Tensor, requests: list[Signal]
                      ) -> tuple[Any, torch.Tensor, dict[Signal, torch.Tensor]]:
        """The model's own vision forward on a per-call view whose merger only regroups the patches (the
        model's modules are never replaced: other threads may be running them): its output, the units
        (units, unit x C) in the order the model's merger outputs them, and each requested signal per unit
        (keys: (units, unit x width), its patches' keys side by side; attention received: (units,), the
        mean over its patches)."""
        grouping = _GroupUnits(self.merge_size ** 2)
        visual = module_view(self.visual, merger=grouping)
        frames = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        with self._block_signals(requests, grouping, frames):
            output = visual(pixels.type(self.visual.dtype), grid_thw=grid_thw)
        grouped = output.pooler_output  # (units, unit, C + extras): each unit's patches side by side
        hidden = self.visual.config.hidden_size
        found, start = {}, hidden
        for request in requests:
            if isinstance(request, AttentionReceived):
                found[request] = grouped[..., start].mean(-1)
                start += 1
                continue
            size = hidden if request.heads == "concat" else hidden // self.visual.config.num_heads
            found[request] = grouped[..., start:start + size].flatten(1)
            start += size
        return output, grouped[..., :hidden].to(grouping.dtype).flatten(1), found

    @contextlib.contextmanager
    def _block_signals(self, requests: list[Signal], grouping: _GroupUnits, frames: list[int]) -> Iterator[None]:
        """While the encoder runs: each requested signal of its block, per patch in the encoder's order,
        handed to ``grouping`` to travel with the features (this thread's calls only). Keys: the k third
        of the block's qkv projection, read as the block computes it, before the rotary embedding.
        Attention received: :func:`received_capture` (``frames``: patches per image or video frame)."""
        blocks = self.visual.blocks
        heads = self.visual.config.num_heads

        def keys_of(request: Signal) -> Any:
            def keys(qkv: torch.Tensor) -> torch.Tensor:
                key = qkv.unflatten(-1, (3, -1))[:, 1]
                return key.unflatten(-1, (heads, -1)).mean(-2) if request.heads == "mean" else key
            return keys

        with contextlib.ExitStack() as captures:
            found = []
            for request in requests:
                block = blocks[request.layer % len(blocks)]
                if isinstance(request, AttentionReceived):
                    found.append(captures.enter_context(received_capture(block.attn, frames, request.heads)))
                elif isinstance(request, EncoderKeys):
                    found.append(captures.enter_context(captured_output(block.attn.qkv, keys_of(request))))
                else:
                    raise CompressionError(f"the {self.family} adapter cannot compute {request.describe()}")
            grouping.extra = found
            yield

    def encoder_pixels(self, inputs: dict[str, Any], image: int) -> torch.Tensor:
        """Rebuild the picture from the flattened patches (first frame): the processor lays each patch
        out as (channel, temporal, row, column) and orders patches by merge unit (unit row, unit
        column, row in the unit, column in the unit)."""
        vision = self.model.config.vision_config
        patch, merge, temporal = vision.patch_size, self.merge_size, vision.temporal_patch_size
        grids = inputs["image_grid_thw"].tolist()
        _, height, width = grids[image]
        start = sum(t * h * w for t, h, w in grids[:image])
        flat = inputs["pixel_values"][start:start + height * width]
        units = flat.reshape(height // merge, width // merge, merge, merge, -1, temporal, patch, patch)[..., 0, :, :]
        # (unit row, unit col, row in unit, col in unit, C, y, x) -> (C, unit row, row in unit, y, unit col, ...)
        return units.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, height * patch, width * patch)

    def encoder_width(self) -> int:
        """A token in encoder space is one merged cell: its merge_size x merge_size patches, concatenated."""
        return int(self.visual.merger.mlp[0].in_features)

    def encoder_heads(self) -> int:
        return int(self.model.config.vision_config.num_heads)

    def projector_mlp(self) -> ProjectorMLP | None:
        merger = self.visual.merger
        first, act, second = merger.mlp[0], merger.mlp[1], merger.mlp[2]
        width = first.in_features // self.merge_size ** 2
        return ProjectorMLP(first, act, second, norm=merger.ln_q, norm_width=width)

    def project(self, tokens: TokenState) -> TokenState:
        merger = self.visual.merger
        images, slots, width = tokens.embeddings.shape
        patches = tokens.embeddings.reshape(images * slots * self.merge_size ** 2, -1)
        projected = merger.mlp(merger.ln_q(patches).view(images * slots, width))
        return tokens.to_space(projected.reshape(images, slots, -1), "llm")

    def image_spans(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState) -> list[ImageSpan]:
        """Images first (in order), then videos: each kind has its own placeholder id."""
        config = self.model.config
        is_video = self.media.get("is_video", [False] * tokens.num_images)
        spans: list[ImageSpan] = []
        for kind, token_id in ((False, config.image_token_id), (True, config.video_token_id)):
            indices = [i for i, video in enumerate(is_video) if video == kind]
            if not indices:
                if bool(((input_ids == token_id) & valid).any()):
                    raise CompressionError("the prompt has placeholders for media that were not given")
                continue
            subset = TokenState.from_dense(tokens.embeddings[indices], tokens.original_grid[indices])
            found = super()._spans_for(input_ids, valid, subset, token_id)
            spans += [ImageSpan(s.sample, s.start, s.length, indices[s.image]) for s in found]
        return spans

    def image_positions(
        self, start: int, tokens: TokenState, image: int, slots: torch.Tensor, compact: bool
    ) -> tuple[list[list[int]], int]:
        t, h, w = (int(v) for v in tokens.grid[image])
        if compact:
            ranks = list(range(start, start + len(slots)))
            return [ranks, ranks, ranks], start + len(slots)
        grid_index = tokens.grid_index[image, slots]
        cell = grid_index.clamp_min(0)
        frame = cell // max(h * w, 1)
        row = (cell % max(h * w, 1)) // max(w, 1)
        col = cell % max(w, 1)
        interval = self.media.get("time_interval", [1.0] * tokens.num_images)[image]
        temporal = (frame.double() * interval).long() + start
        # summary tokens (no cell) follow the grid like text: the same position on all three axes
        after, end = summary_positions(grid_index, start + max(h, w))
        gridded = grid_index >= 0
        return [torch.where(gridded, axis, after).tolist() for axis in (temporal, row + start, col + start)], end

    def call_layer(self, layer_index, hidden, attention_mask, positions, position_embeddings, cache):
        return self._run_layer(layer_index, hidden, attention_mask, None, position_embeddings, cache)

    def position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor,
                            layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, positions)

    def rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor,
                      layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.position_embeddings(hidden, positions, layer)
        return compat.interleave_mrope(cos, sin, self.text_config.rope_parameters["mrope_section"])

    def make_output(self, last_hidden_state: torch.Tensor, cache: Any, image_features: list[torch.Tensor] | None,
                    position_offset: torch.Tensor) -> Any:
        return compat.build_output(compat.output_class(self.inner_module()), last_hidden_state, cache,
                                   image_features, rope_deltas=position_offset.unsqueeze(1))

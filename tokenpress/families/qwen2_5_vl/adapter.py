"""Qwen2.5-VL (``transformers.Qwen2_5_VLForConditionalGeneration``).

* Encoder: the window-attention ViT. Its patches come grouped in 2x2 merge units; tokenpress sees
  one token per merge unit (the four patch features side by side, 4C wide), laid out on the LLM's
  own grid (t, h/2, w/2) in raster order, so positions mean the same thing before and after the
  projector.
* ``projector``: the 2x2 patch merger (RMSNorm per patch, then the MLP over the unit).
* Positions: 3-D M-RoPE. ``original``: a visual token keeps the (t, h, w) position
  ``get_rope_index`` gives it; text continues after ``max(h, w)`` of each image, as in the model.
  ``compact``: the kept tokens are numbered one after another on all three axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.qwen2_5_vl.costs import Qwen2_5_VLCosts
from tokenpress.runtime import compat
from tokenpress.runtime.adapter import ImageSpan, ModelAdapter, ProjectorMLP, summary_positions
from tokenpress.runtime.encoder import captured_output, module_view


class _GroupUnits(nn.Module):
    """Stands in for the merger while encoding: regroups patches into 2x2 units, no weights. Values
    captured per patch inside the encoder (``extra``, in the encoder's own patch order) are grouped
    the same way beside the features, so the model's own reordering of units carries them along."""

    def __init__(self, unit: int) -> None:
        super().__init__()
        self.unit = unit
        self.extra: list[list[torch.Tensor]] = []  # per value: what was captured (the last capture is used)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([hidden, *(captured[-1] for captured in self.extra)], dim=-1)
        return hidden.reshape(-1, self.unit, hidden.shape[-1])


class Qwen2_5_VLAdapter(ModelAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (images; videos go through pre-LLM points)."""

    family = "qwen2.5-vl"
    signals = ("keys",)  # per merge unit: its 2x2 patches' keys side by side, as the features are
    no_signals_because = "its windowed ViT has no class token, so no CLS attention"
    position_rank = 3
    cost_model = Qwen2_5_VLCosts
    test_family = "tokenpress.families.qwen2_5_vl.testbed:QWEN2_5_VL"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "qwen2_5_vl" and hasattr(model, "model")

    def inner_module(self) -> nn.Module:
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

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
                "this Qwen2.5-VL text config has no rope_parameters['mrope_section'], which tokenpress needs "
                f"for M-RoPE (transformers {compat.transformers_version()}; tested: {compat.TESTED_TRANSFORMERS})")

    def encoder_stages_refusal(self) -> str:
        return ("Qwen2.5-VL's vision encoder attends within fixed windows of 2x2-patch units and its merger needs "
                "every unit whole, so tokens cannot change between its blocks; merge after the encoder instead")

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: Any = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        grids, pixels, intervals = [], [], []
        tokens_per_second = getattr(self.model.config.vision_config, "tokens_per_second", 1)
        if inputs.get("pixel_values") is not None:
            grids.append(inputs["image_grid_thw"])
            pixels.append(inputs["pixel_values"])
            intervals += [1.0] * len(inputs["image_grid_thw"])
        if inputs.get("pixel_values_videos") is not None:
            grids.append(inputs["video_grid_thw"])
            pixels.append(inputs["pixel_values_videos"])
            seconds = inputs.get("second_per_grid_ts")
            count = len(inputs["video_grid_thw"])
            seconds = [1.0] * count if seconds is None else [float(s) for s in seconds]
            intervals += [tokens_per_second * s for s in seconds]
        grid_thw = torch.cat(grids).long()
        keyed = list(dict.fromkeys(requests))
        units = []
        for p, g in zip(pixels, grids, strict=True):
            grouping = _GroupUnits(self.merge_size ** 2)
            # the model's own vision forward on a per-call view whose merger only regroups the patches:
            # the model's modules are never replaced (other threads may be running them)
            visual = module_view(self.visual, merger=grouping)
            with self._block_keys(keyed, grouping):
                units.append(visual(p.type(self.visual.dtype), grid_thw=g).pooler_output)
        units = torch.cat(units)  # (units, unit, C + extras): each unit's patches side by side
        hidden = self.visual.config.hidden_size
        extras, start = {}, hidden
        for request in keyed:
            size = hidden if request.heads == "concat" else hidden // self.visual.config.num_heads
            extras[request] = units[..., start:start + size].flatten(1)
            start += size
        units = units[..., :hidden].flatten(1)
        llm_grids = grid_thw.clone()
        llm_grids[:, 1:] //= self.merge_size
        grids = [tuple(grid) for grid in llm_grids.tolist()]
        counts = [t * h * w for t, h, w in grids]
        width = max(counts)
        rows = [torch.nn.functional.pad(chunk, (0, 0, 0, width - chunk.shape[0]))
                for chunk in torch.split(units, counts)]
        tokens = TokenState.from_dense(torch.stack(rows), grids)
        images = len(inputs["image_grid_thw"]) if inputs.get("pixel_values") is not None else 0
        self.media = {"time_interval": intervals, "is_video": [False] * images + [True] * (len(intervals) - images)}
        found = {request: torch.stack([torch.nn.functional.pad(chunk, (0, 0, 0, width - chunk.shape[0]))
                                       for chunk in torch.split(value, counts)])
                 for request, value in extras.items()}
        return tokens, found

    @contextlib.contextmanager
    def _block_keys(self, requests: list[Signal], grouping: _GroupUnits) -> Iterator[None]:
        """While the encoder runs: each requested block's keys (the k third of its qkv projection, read
        as the block computes it, before the rotary embedding), per patch in the encoder's order, handed
        to ``grouping`` to travel with the features (this thread's calls only)."""
        blocks = self.visual.blocks
        heads = self.visual.config.num_heads

        def keys_of(request: Signal) -> Any:
            def keys(qkv: torch.Tensor) -> torch.Tensor:
                key = qkv.unflatten(-1, (3, -1))[:, 1]
                return key.unflatten(-1, (heads, -1)).mean(-2) if request.heads == "mean" else key
            return keys

        with contextlib.ExitStack() as captures:
            found = [captures.enter_context(captured_output(blocks[request.layer % len(blocks)].attn.qkv,
                                                            keys_of(request)))
                     for request in requests]
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

"""Qwen3-VL (``transformers.Qwen3VLForConditionalGeneration``) and Qwen3-VL-MoE
(``Qwen3VLMoeForConditionalGeneration``: the same vision tower, DeepStack and M-RoPE; a mixture-of-experts
decoder).

* Encoder: a ViT with full attention within each image and each video frame (no windows, no class token).
  Its patches come grouped in 2x2 merge units; tokenpress sees one token per unit (the four patch features
  side by side, 4C wide) on the LLM's grid (1, h/2, w/2). A video is one TokenState row per temporal slice:
  the processor writes each slice as its own placeholder run (timestamps, as text, between them).
* ``projector``: the model's patch merger (LayerNorm per patch, then the MLP over the unit).
* DeepStack: the model adds K more projections of each unit (its ``deepstack_merger_list``, fed by encoder
  blocks ``deepstack_visual_indexes``) to the visual positions' hidden states after decoder layers 0..K-1.
  tokenpress computes the K vectors of every original unit with the model's own mergers while the encoder
  runs and, once the pre-LLM stages are done, gives each visual token the mean of the vectors of the units
  it stands for (its provenance, ``TokenState.owner``): a kept token gets its own unit's, a merged token the
  mean over its units, i.e. "average after projection" (a merge of projected DeepStack vectors, where the
  features are merged before the projector when a stage merges there). Tokens that stand for no unit of
  their own (a Q-Former's learned queries: summary tokens) get none. In the decoder the vectors travel
  beside the hidden states (``Sequence.extra``): a dropped token's go with it, a decoder ``Merge`` merges
  the pending levels with the hidden states' weights, and a token routed around layer k still receives
  level k after it (in the model it is an addition to the residual stream, not part of the layer).
* Positions: 3-D M-RoPE, interleaved by the model's own rotary embedding (position ids are always
  (3, B, N)). ``original``: a visual token keeps the (t, h, w) position ``get_rope_index`` gives it; text
  continues after ``max(h, w)`` of each image or slice, as in the model. ``compact``: the kept tokens are
  numbered one after another on all three axes.
* Signals, per unit as the features are: ``keys`` and ``attention_received`` (within each image or frame).
"""

from __future__ import annotations

from dataclasses import replace as dc_replace
from typing import Any, ClassVar

import torch
from torch import nn

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.qwen2_5_vl.adapter import Qwen2_5_VLAdapter, split_rows
from tokenpress.families.qwen3_vl.costs import Qwen3VLCosts, Qwen3VLMoeCosts
from tokenpress.runtime import compat
from tokenpress.runtime.adapter import ImageSpan, ProjectorMLP
from tokenpress.runtime.sequence import Sequence

#: ``Sequence.extra`` name of DeepStack level k, still to be added after decoder layer k.
DEEPSTACK = "deepstack_{}"


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Adapter for ``Qwen3VLForConditionalGeneration`` (images and videos; DeepStack follows the tokens)."""

    family = "qwen3-vl"
    #: The ``config.model_type`` this adapter handles.
    model_type: ClassVar[str] = "qwen3_vl"
    signals = ("keys", "attention_received")
    no_signals_because = "its ViT has no class token, so no CLS attention"
    cost_model = Qwen3VLCosts
    test_family = "tokenpress.families.qwen3_vl.testbed:QWEN3_VL"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == cls.model_type and hasattr(model, "model")

    def check_transformers_features(self) -> None:
        super().check_transformers_features()
        visual = self.visual
        if not hasattr(visual, "deepstack_merger_list") or not hasattr(visual, "deepstack_visual_indexes"):
            raise UnsupportedModelError(
                f"this {type(self.model).__name__}'s vision tower has no deepstack_merger_list / "
                "deepstack_visual_indexes, which tokenpress needs for DeepStack (transformers "
                f"{compat.transformers_version()}; tested: {compat.TESTED_TRANSFORMERS})")

    def encoder_stages_refusal(self) -> str:
        return ("Qwen3-VL's patch merger and its DeepStack mergers (fed by encoder blocks "
                f"{', '.join(map(str, self.visual.deepstack_visual_indexes))} and the last) need every 2x2-patch "
                "unit whole, so tokens cannot change between its encoder blocks; merge after the encoder instead")

    @property
    def deepstack_levels(self) -> int:
        """DeepStack levels the decoder adds (one after each of its first K layers)."""
        return min(len(self.visual.deepstack_visual_indexes), self.num_layers)

    # --- pre-LLM --------------------------------------------------------------------------------

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: Any = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        """Images, then videos (each temporal slice a row of its own), as the model encodes them: the units
        (encoder space), each requested signal per unit, and (in :attr:`media`) every unit's DeepStack
        vectors, projected by the model's own DeepStack mergers."""
        keyed = list(dict.fromkeys(requests))
        levels = self.deepstack_levels
        units: list[torch.Tensor] = []
        deepstack: list[list[torch.Tensor]] = [[] for _ in range(levels)]
        extras: dict[Signal, list[torch.Tensor]] = {request: [] for request in keyed}
        grids: list[tuple[int, int, int]] = []
        is_video: list[bool] = []
        for video, (pixels, grid_thw) in zip(self._kinds(inputs), self._media(inputs), strict=True):
            output, grouped, found = self._encode_units(pixels, grid_thw, keyed)
            units.append(grouped)
            for level, features in zip(deepstack, output.deepstack_features[:levels], strict=True):
                level.append(features)
            for request in keyed:
                extras[request].append(found[request])
            for frames, height, width in grid_thw.tolist():
                slice_grid = (1, height // self.merge_size, width // self.merge_size)
                grids += [slice_grid] * frames
                is_video += [video] * frames
        counts = [h * w for _, h, w in grids]
        tokens = TokenState.from_dense(split_rows(torch.cat(units), counts), grids)
        self.media = {"time_interval": [1.0] * len(grids), "is_video": is_video,
                      "deepstack": [split_rows(torch.cat(level), counts) for level in deepstack]}
        return tokens, {request: split_rows(torch.cat(values), counts) for request, values in extras.items()}

    @staticmethod
    def _kinds(inputs: dict[str, Any]) -> list[bool]:
        """Whether each group of :meth:`_media` is the videos."""
        return [video for video, key in ((False, "pixel_values"), (True, "pixel_values_videos"))
                if inputs.get(key) is not None]

    def encoder_width(self) -> int:
        """A token in encoder space is one merge unit: its merge_size x merge_size patches, concatenated."""
        return int(self.visual.merger.linear_fc1.in_features)

    def projector_mlp(self) -> ProjectorMLP | None:
        merger = self.visual.merger
        width = merger.linear_fc1.in_features // self.merge_size ** 2
        return ProjectorMLP(merger.linear_fc1, merger.act_fn, merger.linear_fc2, norm=merger.norm, norm_width=width)

    def project(self, tokens: TokenState) -> TokenState:
        """The model's own merger on the units' patches (it norms each patch, then regroups them)."""
        images, slots, width = tokens.embeddings.shape
        patches = tokens.embeddings.reshape(images * slots * self.merge_size ** 2, -1)
        return tokens.to_space(self.visual.merger(patches).reshape(images, slots, -1), "llm")

    # --- the sequence and the decoder -----------------------------------------------------------

    def build_sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokens: TokenState,
                       prompt_length: int, compact: bool, spans: list[ImageSpan] | None = None,
                       text_embeds: torch.Tensor | None = None) -> Sequence:
        """The base layout, with each visual token's DeepStack vectors still to be added (``Sequence.extra``,
        one entry per level): the mean of the vectors of the original units it stands for."""
        sequence = super().build_sequence(input_ids, attention_mask, tokens, prompt_length, compact, spans,
                                          text_embeds)
        levels = self.media.get("deepstack")
        if levels is None:
            raise CompressionError("Qwen3-VL's DeepStack vectors are made while the encoder runs: build the sequence "
                                   "of the tokens encode_images gave in this prefill")
        return sequence.with_extra(**{DEEPSTACK.format(level): values
                                      for level, values in enumerate(deepstack_per_token(sequence, tokens, levels))})

    def after_layer(self, layer: int, sequence: Sequence) -> Sequence:
        """DeepStack level ``layer`` added to every visual token's hidden state (routed-around ones too),
        as the model adds it after that decoder layer; then no longer carried."""
        name = DEEPSTACK.format(layer)
        if not sequence.extra or name not in sequence.extra:
            return sequence
        level = sequence.extra[name]
        visual = (sequence.is_visual & sequence.valid).unsqueeze(-1)
        hidden = torch.where(visual, sequence.hidden + level.to(sequence.hidden.dtype), sequence.hidden)
        extra = {key: value for key, value in sequence.extra.items() if key != name}
        return dc_replace(sequence, hidden=hidden, extra=extra or None)

    def rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor,
                      layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (B, N, d) as the decoder's attention applies them: Qwen3-VL's rotary embedding
        interleaves the t, h and w frequencies itself (no chunked M-RoPE sections to apply)."""
        cos, sin = self.position_embeddings(hidden, positions, layer)
        if cos.dim() != 3:
            raise CompressionError(f"Qwen3-VL's rotary embedding gave tables of shape {tuple(cos.shape)}, expected "
                                   "(batch, tokens, head_dim)")
        return cos, sin


def deepstack_per_token(sequence: Sequence, tokens: TokenState, levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each laid-out token's vector of every DeepStack level, (B, N, D) each: for a visual token, the mean of
    ``levels[k]`` (rows, original units, D) over the original units of its row it stands for
    (``tokens.owner``); zero for text and for tokens that stand for no unit of their own."""
    images, slots = tokens.num_images, tokens.num_slots
    owner = tokens.owner  # (rows, units): the slot standing for each original unit (-1 dropped, SHARED)
    target = torch.where(owner >= 0, owner, slots)  # units with no slot of their own go to a dump slot
    members = torch.zeros(images, slots + 1, dtype=torch.float32, device=owner.device)
    members.scatter_add_(1, target, torch.ones_like(target, dtype=torch.float32))
    members = members[:, :slots].clamp_min(1).unsqueeze(-1)
    visual_id = sequence.visual_id
    laid_out = (visual_id >= 0).unsqueeze(-1)
    per_token = []
    for level in levels:
        width = level.shape[-1]
        sums = torch.zeros(images, slots + 1, width, dtype=torch.float32, device=level.device)
        sums.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, width), level.float())
        table = (sums[:, :slots] / members).to(level.dtype).reshape(images * slots, width)
        gathered = table[visual_id.clamp_min(0)]
        per_token.append(torch.where(laid_out, gathered, torch.zeros_like(gathered)))
    return per_token


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Adapter for ``Qwen3VLMoeForConditionalGeneration``: Qwen3-VL with a mixture-of-experts decoder. Every
    token is routed to its experts (no capacity limit), so dropped or merged tokens simply route fewer
    or merged hidden states. Its inner forward's output is the class it really returns, not the one it
    declares from transformers 5.24 (``compat.output_class``: ``compat.RETURNED_OUTPUTS``), with
    ``router_logits`` left None (an outer forward asked for ``output_router_logits`` gets no auxiliary loss)."""

    family = "qwen3-vl-moe"
    model_type = "qwen3_vl_moe"
    cost_model = Qwen3VLMoeCosts
    test_family = "tokenpress.families.qwen3_vl.testbed:QWEN3_VL_MOE"

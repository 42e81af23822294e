"""Qwen3-VL's FLOPs model: the ViT (full attention within each image or video frame) with its DeepStack mergers
over every unit, the patch merger over the projected units, the received-attention signal; the MoE variant's
decoder (router and the experts each token is routed to)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenpress.core.flops import DecoderShape, FlopsError, vit_block_flops
from tokenpress.families.qwen2_5_vl.costs import Qwen2_5_VLCosts


class Qwen3VLCosts(Qwen2_5_VLCosts):
    """Qwen3-VL's prefill costs. The encoder: the patch embedding, every block (full attention within each
    image or frame) and the K DeepStack mergers over every unit (tokenpress runs them while the encoder
    runs, whatever the stages keep). The projector: the patch merger over the units it really sees. The
    attention received costs 2 n^2 C per image or frame of n patches (see :class:`Qwen2_5_VLCosts`)."""

    model_type = "qwen3_vl"
    label = "Qwen3-VL"
    qk_norm = True

    def vision_flops(self, frames: int, grid_h: int, grid_w: int) -> float:
        vision = self.vision
        hidden = vision.hidden_size
        patches = frames * grid_h * grid_w
        channels = getattr(vision, "in_channels", None) or 3
        embed = 2.0 * patches * channels * vision.temporal_patch_size * vision.patch_size ** 2 * hidden
        attention_keys = frames * (grid_h * grid_w) ** 2  # full attention within each frame
        blocks = vision.depth * vit_block_flops(patches, hidden, vision.intermediate_size, False, attention_keys)
        deepstack = len(vision.deepstack_visual_indexes) * self.projector_flops(patches // self.merge ** 2)
        return embed + blocks + deepstack


@dataclass(frozen=True)
class MoeDecoderShape(DecoderShape):
    """A decoder whose every layer is a mixture of experts: ``intermediate`` is the width its tokens go through
    (experts per token x an expert's width, gated), plus the router (hidden x experts) per token."""

    experts: int = 0

    def layer_flops(self, tokens: float, keys: float | None = None) -> float:
        return super().layer_flops(tokens, keys) + 2.0 * tokens * self.hidden * self.experts


class Qwen3VLMoeCosts(Qwen3VLCosts):
    """Qwen3-VL-MoE's prefill costs: Qwen3-VL's, with decoder layers whose MLP is the router and the top-k
    experts each token is routed to (every token is routed: no capacity limit). The released checkpoints
    make every layer sparse; a config that mixes dense and sparse layers is refused (the FLOPs model charges
    every decoder layer alike)."""

    model_type = "qwen3_vl_moe"
    label = "Qwen3-VL-MoE"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        text = config.get_text_config()
        layers = range(text.num_hidden_layers)
        experts = getattr(text, "num_experts", 0) or 0
        sparse = [layer for layer in layers if layer not in (getattr(text, "mlp_only_layers", None) or [])
                  and experts > 0 and (layer + 1) % (getattr(text, "decoder_sparse_step", 1) or 1) == 0]
        if sparse and len(sparse) != len(layers):
            raise FlopsError(f"{self.label}: this config mixes dense and mixture-of-experts decoder layers (sparse: "
                             f"{sparse}); the FLOPs model charges every decoder layer alike")
        if sparse:
            dense = self.decoder
            self.decoder = MoeDecoderShape(dense.hidden, dense.heads, dense.kv_heads, dense.head_dim,
                                           text.num_experts_per_tok * text.moe_intermediate_size, dense.layers,
                                           dense.gated_mlp, dense.vocab, dense.qk_norm, experts=experts)

"""Analytical prefill FLOPs of a vision-language model from its config and per-layer token counts.

Counted like ``torch.utils.flop_counter``: a multiply-add is 2 FLOPs; only matrix products count
(norms, activations, softmax and rotary are ignored, as are biases). Attention counts the full
query x key product (what eager and SDPA kernels compute), i.e. 4 * n * keys * heads * head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder layer."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   config.intermediate_size, config.num_hidden_layers)

    def layer_flops(self, tokens: float, keys: float | None = None) -> float:
        """FLOPs of one layer processing ``tokens`` queries against ``keys`` keys (default: the same)."""
        keys = tokens if keys is None else keys
        q_and_o = 2 * 2 * tokens * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * 2 * tokens * self.hidden * self.kv_heads * self.head_dim
        attention = 2 * 2 * tokens * keys * self.heads * self.head_dim
        mlp = 2 * (3 if self.gated_mlp else 2) * tokens * self.hidden * self.intermediate
        return q_and_o + k_and_v + attention + mlp


@dataclass(frozen=True)
class EncoderShape:
    """A ViT encoder (CLIP-style: non-gated MLP, full attention) and a 2-layer MLP projector."""

    hidden: int
    heads: int
    intermediate: int
    layers: int
    patch_dim: int
    projector_in: int
    projector_hidden: int

    def flops(self, patches: float, projected: float) -> float:
        tokens = patches + 1  # CLS
        layer = DecoderShape(self.hidden, self.heads, self.heads, self.hidden // self.heads, self.intermediate, 1,
                             gated_mlp=False).layer_flops(tokens)
        embed = 2 * patches * self.patch_dim * self.hidden
        projector = 2 * projected * (self.projector_in * self.projector_hidden + self.projector_hidden ** 2)
        return embed + self.layers * layer + projector


def llava_shapes(config: Any) -> tuple[EncoderShape, DecoderShape]:
    """The encoder and decoder shapes of a LLaVA-style config."""
    vision = config.vision_config
    text = config.text_config
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    encoder = EncoderShape(vision.hidden_size, vision.num_attention_heads, vision.intermediate_size,
                           vision.num_hidden_layers, 3 * vision.patch_size ** 2,
                           vision.hidden_size * feature_layers, text.hidden_size)
    return encoder, DecoderShape.from_config(text)


def decoder_prefill_flops(shape: DecoderShape, layer_tokens: list[float]) -> float:
    """Decoder FLOPs when layer l processes ``layer_tokens[l]`` tokens (all of them, causally)."""
    if len(layer_tokens) != shape.layers:
        raise ValueError(f"{len(layer_tokens)} token counts for a {shape.layers}-layer decoder")
    return sum(shape.layer_flops(tokens) for tokens in layer_tokens)

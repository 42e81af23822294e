"""What CLIP-style vision towers share (CLIP in the LLaVA families; SigLIP, the same blocks without a class
token): encoder signals (the class token's attention, the attention each patch receives, a block's keys)
recomputed from a block's own norm and projections, and running the tower block by block with stages
inside it (ToMe, FOLDER)."""

from __future__ import annotations

import torch
from torch import nn

from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys, Signal
from tokenpress.core.tokens import TokenState
from tokenpress.runtime.context import EncoderBlock
from tokenpress.runtime.encoder import (
    EncoderRun,
    InsideEncoder,
    attention_received,
    captured_output,
    gather_rows,
    size_bias,
    sort_by_cell,
)


def cls_attention(encoder_layer: nn.Module, layer_input: torch.Tensor, heads: str = "mean",
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention the CLS token (slot 0) pays to every patch inside a CLIP-style encoder layer.

    Recomputed from the layer's own norm and q/k projections for the one CLS row: (I, N) over the
    patches (CLS column removed); ``heads="mean"`` averages the layer's per-head softmax,
    ``heads="full"`` is one head over the full width (scale 1/sqrt(C)). ``bias`` (I, 1, 1, 1 + N) is
    the block's additive mask after merges inside the encoder (:func:`tokenpress.runtime.encoder.size_bias`).
    No N x N matrix is formed.
    """
    attention = encoder_layer.self_attn
    normed = encoder_layer.layer_norm1(layer_input)
    images, length, width = normed.shape
    count, head_dim, scale = ((attention.num_heads, attention.head_dim, attention.scale) if heads == "mean"
                              else (1, width, width ** -0.5))
    query = attention.q_proj(normed[:, :1]).view(images, 1, count, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(images, length, count, head_dim).transpose(1, 2)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0, 1:]


def received_attention(encoder_layer: nn.Module, layer_input: torch.Tensor, heads: str = "mean",
                       class_token: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(I, N) over the patches: the attention each patch receives inside a CLIP-style encoder layer, averaged
    over every query of its tile (the class token's included) and over heads (``heads="full"``: one head
    over the full width), recomputed from the layer's own norm and q/k (a block of queries at a time)."""
    attention = encoder_layer.self_attn
    normed = encoder_layer.layer_norm1(layer_input)
    images, length, width = normed.shape
    count, head_dim, scale = ((attention.num_heads, attention.head_dim, attention.scale) if heads == "mean"
                              else (1, width, width ** -0.5))
    query = attention.q_proj(normed).view(images, length, count, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(images, length, count, head_dim).transpose(1, 2)
    received = attention_received(query, key, scale, bias)
    return received[:, 1:] if class_token else received


def clip_signal(block: nn.Module, layer_input: torch.Tensor, request: Signal,
                bias: torch.Tensor | None = None, class_token: bool = True) -> torch.Tensor:
    """One requested signal of a CLIP-style encoder layer on its input (the class token, where there is
    one, at slot 0), over the patches (class token removed)."""
    first = 1 if class_token else 0
    if isinstance(request, ClsAttention) and class_token:
        return cls_attention(block, layer_input, request.heads, bias)
    if isinstance(request, AttentionReceived):
        return received_attention(block, layer_input, request.heads, class_token, bias)
    if isinstance(request, EncoderKeys):
        keys = block.self_attn.k_proj(block.layer_norm1(layer_input))[:, first:]
        return keys.unflatten(-1, (block.self_attn.num_heads, -1)).mean(-2) if request.heads == "mean" else keys
    raise ValueError(f"this encoder does not compute {request.describe()}")


def clip_signals(layers: nn.ModuleList, hidden_states: tuple[torch.Tensor, ...], requests: list[Signal],
                 class_token: bool = True) -> dict[Signal, torch.Tensor]:
    """Each requested signal of a CLIP-style encoder run (``hidden_states[l]`` enters layer l, the class
    token, where there is one, at slot 0): per tile, over its patches."""
    found: dict[Signal, torch.Tensor] = {}
    for request in dict.fromkeys(requests):  # each distinct request once
        layer = request.layer % len(layers)
        found[request] = clip_signal(layers[layer], hidden_states[layer], request, class_token=class_token)
    return found


def clip_encode_inside(tower: nn.Module, pixel_values: torch.Tensor, blocks: int, grid: tuple[int, int, int],
                       row_images: list[int], requests: list[Signal], inside: InsideEncoder,
                       class_token: bool = True) -> tuple[TokenState, dict[Signal, torch.Tensor], EncoderRun]:
    """Run a CLIP-style vision tower block by block with stages inside the blocks ``inside`` lists.

    Every encoder row (image or tile) of ``grid`` patches is one TokenState row; the class token, where
    the tower has one (``class_token``: CLIP; SigLIP has none), is held beside it (never merged). The
    embeddings go through the tower's pre-layernorm where it has one (CLIP's ``pre_layrnorm``; SigLIP has
    none). In a block with stages they run between its attention and its MLP (``inside``); once they
    changed the tokens, later blocks attend with :func:`size_bias`. The output of block ``blocks - 1`` is
    the features, the tokens sorted back into raster order of their cells; each requested signal is
    computed on its layer's input, over the tokens of that moment, and laid out like the features
    (attaching refuses a signal read before a block that merges). Inside the encoder, ``image_to_sample``
    holds each row's image (``row_images``): samples are matched later."""
    vision = getattr(tower, "vision_model", tower)
    layers = vision.encoder.layers
    first = 1 if class_token else 0
    hidden = vision.embeddings(pixel_values)
    pre_norm = getattr(vision, "pre_layrnorm", None)
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    tokens = TokenState.from_dense(hidden[:, first:], grid, torch.tensor(row_images, device=hidden.device))
    by_layer: dict[int, list[Signal]] = {}
    for request in dict.fromkeys(requests):
        by_layer.setdefault(request.layer % len(layers), []).append(request)
    bias: torch.Tensor | None = None  # None until a stage changes the tokens: the block runs as the model does
    found: dict[Signal, torch.Tensor] = {}
    run = EncoderRun(row_images=list(row_images))
    for index in range(max(blocks - 1, *by_layer, 0) + 1):
        for request in by_layer.get(index, []):
            found[request] = clip_signal(layers[index], hidden, request, bias, class_token)
        if index >= blocks:
            continue
        block = layers[index]
        run.attention.append(tokens.counts())
        with captured_output(block.self_attn.k_proj) as keys:
            attended, _ = block.self_attn(hidden_states=block.layer_norm1(hidden), attention_mask=bias)
        hidden = hidden + attended
        if index in inside.layers:
            before = tokens.replace(hidden[:, first:])
            heads = block.self_attn.num_heads
            block_keys = keys[0][:, first:].unflatten(-1, (heads, -1))
            tokens = inside(EncoderBlock(index, blocks, block_keys, class_token), before)
            if tokens is not before:
                hidden = torch.cat([hidden[:, :first], tokens.embeddings.to(hidden.dtype)], dim=1)
                bias = size_bias(tokens, hidden.dtype, class_token=class_token)
        run.mlp.append(tokens.counts())
        hidden = hidden + block.mlp(block.layer_norm2(hidden))
        tokens = tokens.replace(hidden[:, first:])
    tokens, order = sort_by_cell(tokens)
    return tokens, {request: gather_rows(value, order) for request, value in found.items()}, run


class ClipTower:
    """The vision tower of the LLaVA families (``model.model.vision_tower``, a CLIP or SigLIP encoder whose
    features are ``hidden_states[vision_feature_layer]``): its blocks, and how many of them feed the features.
    A mixin for a :class:`~tokenpress.runtime.adapter.ModelAdapter` subclass (listed before it)."""

    model: nn.Module

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def _encoder_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def num_encoder_layers(self) -> int:
        return len(self._encoder_layers())

    def feature_blocks(self) -> int | None:
        return feature_block_count(self.model.config.vision_feature_layer, self.num_encoder_layers())

    def encoder_stages_refusal(self) -> str:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            return (f"this model concatenates the features of encoder layers {list(layer)}, so no stage can change "
                    "the tokens inside its encoder")
        return "this model's features are its encoder's input embeddings (vision_feature_layer 0): no block feeds them"


def feature_block_count(feature_layer: int | list[int], encoder_layers: int) -> int | None:
    """How many CLIP blocks feed the features: they are ``hidden_states[vision_feature_layer]``, the
    output of that many blocks (None: several layers' features concatenated, or the embeddings alone)."""
    if not isinstance(feature_layer, int):
        return None
    return feature_layer % (encoder_layers + 1) or None

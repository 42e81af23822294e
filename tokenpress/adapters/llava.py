"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``): CLIP-style encoder, MLP projector,
Llama-style decoder, one run of ``image_token_id`` placeholders per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenpress.adapters.base import ModelAdapter, ProjectorMLP
from tokenpress.context import EncoderBlock
from tokenpress.encoder import EncoderRun, InsideEncoder, captured_output, gather_rows, size_bias, sort_by_cell
from tokenpress.errors import UnsupportedModelError
from tokenpress.flops import FamilyCosts, ImageCosts, SimulatedRow, llava_shapes
from tokenpress.signals import ClsAttention, EncoderKeys, Signal
from tokenpress.tokens import TokenState


def cls_attention(encoder_layer: nn.Module, layer_input: torch.Tensor, heads: str = "mean",
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention the CLS token (slot 0) pays to every patch inside a CLIP-style encoder layer.

    Recomputed from the layer's own norm and q/k projections for the one CLS row: (I, N) over the
    patches (CLS column removed); ``heads="mean"`` averages the layer's per-head softmax,
    ``heads="full"`` is one head over the full width (scale 1/sqrt(C)). ``bias`` (I, 1, 1, 1 + N) is
    the block's additive mask after merges inside the encoder (:func:`tokenpress.encoder.size_bias`).
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


def clip_signal(block: nn.Module, layer_input: torch.Tensor, request: Signal,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """One requested signal of a CLIP-style encoder layer on its input (the CLS token at slot 0), over
    the patches (CLS removed)."""
    if isinstance(request, ClsAttention):
        return cls_attention(block, layer_input, request.heads, bias)
    if isinstance(request, EncoderKeys):
        keys = block.self_attn.k_proj(block.layer_norm1(layer_input))[:, 1:]
        return keys.unflatten(-1, (block.self_attn.num_heads, -1)).mean(-2) if request.heads == "mean" else keys
    raise ValueError(f"a CLIP encoder does not compute {request.describe()}")


def clip_signals(layers: nn.ModuleList, hidden_states: tuple[torch.Tensor, ...],
                 requests: list[Signal]) -> dict[Signal, torch.Tensor]:
    """Each requested signal of a CLIP-style encoder run (``hidden_states[l]`` enters layer l, the
    CLS token at slot 0): per tile, over its patches (CLS removed)."""
    found: dict[Signal, torch.Tensor] = {}
    for request in dict.fromkeys(requests):  # each distinct request once
        layer = request.layer % len(layers)
        found[request] = clip_signal(layers[layer], hidden_states[layer], request)
    return found


def clip_encode_inside(tower: nn.Module, pixel_values: torch.Tensor, blocks: int, grid: tuple[int, int, int],
                       row_images: list[int], requests: list[Signal],
                       inside: InsideEncoder) -> tuple[TokenState, dict[Signal, torch.Tensor], EncoderRun]:
    """Run a CLIP vision tower block by block with stages inside the blocks ``inside`` lists.

    Every encoder row (image or tile) of ``grid`` patches is one TokenState row, the class token held
    beside it (never merged). In a block with stages they run between its attention and its MLP
    (``inside``); once they changed the tokens, later blocks attend with :func:`size_bias`. The output
    of block ``blocks - 1`` is the features, the tokens sorted back into raster order of their cells;
    each requested signal is computed on its layer's input, over the tokens of that moment, and laid
    out like the features (attaching refuses a signal read before a block that merges). Inside the
    encoder, ``image_to_sample`` holds each row's image (``row_images``): samples are matched later."""
    vision = getattr(tower, "vision_model", tower)
    layers = vision.encoder.layers
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    tokens = TokenState.from_dense(hidden[:, 1:], grid, torch.tensor(row_images, device=hidden.device))
    by_layer: dict[int, list[Signal]] = {}
    for request in dict.fromkeys(requests):
        by_layer.setdefault(request.layer % len(layers), []).append(request)
    bias: torch.Tensor | None = None  # None until a stage changes the tokens: the block runs as the model does
    found: dict[Signal, torch.Tensor] = {}
    run = EncoderRun(row_images=list(row_images))
    for index in range(max(blocks - 1, *by_layer, 0) + 1):
        for request in by_layer.get(index, []):
            found[request] = clip_signal(layers[index], hidden, request, bias)
        if index >= blocks:
            continue
        block = layers[index]
        run.attention.append(tokens.counts())
        with captured_output(block.self_attn.k_proj) as keys:
            attended, _ = block.self_attn(hidden_states=block.layer_norm1(hidden), attention_mask=bias)
        hidden = hidden + attended
        if index in inside.layers:
            before = tokens.replace(hidden[:, 1:])
            heads = block.self_attn.num_heads
            tokens = inside(EncoderBlock(index, blocks, keys[0][:, 1:].unflatten(-1, (heads, -1)), True), before)
            if tokens is not before:
                hidden = torch.cat([hidden[:, :1], tokens.embeddings.to(hidden.dtype)], dim=1)
                bias = size_bias(tokens, hidden.dtype, class_token=True)
        run.mlp.append(tokens.counts())
        hidden = hidden + block.mlp(block.layer_norm2(hidden))
        tokens = tokens.replace(hidden[:, 1:])
    tokens, order = sort_by_cell(tokens)
    return tokens, {request: gather_rows(value, order) for request, value in found.items()}, run


def feature_block_count(feature_layer: int | list[int], encoder_layers: int) -> int | None:
    """How many CLIP blocks feed the features: they are ``hidden_states[vision_feature_layer]``, the
    output of that many blocks (None: several layers' features concatenated, or the embeddings alone)."""
    if not isinstance(feature_layer, int):
        return None
    return feature_layer % (encoder_layers + 1) or None


class LlavaCosts(FamilyCosts):
    """LLaVA-1.5's prefill costs: a CLIP-style encoder over one tile, the 2-layer MLP projector."""

    model_type = "llava"
    label = "LLaVA-1.5"

    def __init__(self, config: Any) -> None:
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("tokenpress supports LLaVA configs with vision_feature_select_strategy="
                                        f"'default', this one has {config.vision_feature_select_strategy!r}")
        super().__init__(config)
        self.shape = llava_shapes(config)[0]
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """Every image is resized to the encoder's size: ``image_size`` only adds a note."""
        side = self.config.vision_config.image_size
        notes = () if image_size is None else (f"image size ignored: LLaVA-1.5 resizes every image to {side}x{side}",)
        tokens = self.side ** 2
        return ImageCosts([SimulatedRow((1, self.side, self.side), tokens)], self.shape.encoder_flops(tokens), tokens,
                          notes)

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        image, images = self.image(None), int(inputs["pixel_values"].shape[0])
        return images * image.encoder, [image.projected] * images

    def projector_flops(self, tokens: int) -> float:
        return self.shape.projector_flops(tokens)

    def feature_blocks(self) -> int | None:
        return feature_block_count(self.config.vision_feature_layer, self.shape.layers)

    def encoder_run_flops(self, attention: list[int], mlp: list[int]) -> float:
        return self.shape.encoder_run_flops(attention, mlp)

    def rows_after_encoder(self, image: ImageCosts, count: int) -> list[SimulatedRow]:
        grid = image.rows[0].grid
        return [SimulatedRow(grid, count, count == grid[1] * grid[2])]

    def widths(self) -> tuple[int, int, int | None, int]:
        return self.shape.projector_in, self.decoder.hidden, self.shape.projector_hidden, self.shape.heads

    def signal_flops(self, request: Signal) -> float:
        tokens, width = self.side ** 2 + 1, self.shape.hidden
        if isinstance(request, EncoderKeys):  # every token's k projection
            return 2.0 * width * width * tokens
        if isinstance(request, ClsAttention):
            # the CLS row's q projection, every token's k projection, and the CLS x tokens logits
            return 2.0 * width * width * (1 + tokens) + 2.0 * tokens * width
        return 0.0


class LlavaAdapter(ModelAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and its relatives)."""

    family = "llava"
    signals = ("cls_attention", "keys")
    cost_model = LlavaCosts
    test_family = "tokenpress.testing.families:LLAVA"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava" and hasattr(model, "model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"the llava adapter needs vision_feature_select_strategy='default' (patch grid without CLS), "
                f"this model has {config.vision_feature_select_strategy!r}"
            )
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (1, side, side)

    def inner_module(self) -> nn.Module:
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

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

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: InsideEncoder | None = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        pixel_values = inputs["pixel_values"]
        if inside is not None:
            tokens, found, run = clip_encode_inside(self.vision_tower, pixel_values, self.feature_blocks(), self.grid,
                                                    list(range(pixel_values.shape[0])), requests, inside)
            self.media["encoder_run"] = run
            return tokens, found
        config = self.model.config
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden_states = outputs.hidden_states
        feature_layer = config.vision_feature_layer
        if isinstance(feature_layer, int):
            features = hidden_states[feature_layer][:, 1:]
        else:
            features = torch.cat([hidden_states[i][:, 1:] for i in feature_layer], dim=-1)
        tokens = TokenState.from_dense(features, self.grid)
        return tokens, clip_signals(self._encoder_layers(), hidden_states, requests)

    def encoder_width(self) -> int:
        return int(self.model.model.multi_modal_projector.linear_1.in_features)

    def encoder_heads(self) -> int:
        return int(self.model.config.vision_config.num_attention_heads)

    def projector_mlp(self) -> ProjectorMLP | None:
        projector = self.model.model.multi_modal_projector
        first, act, second = (getattr(projector, name, None) for name in ("linear_1", "act", "linear_2"))
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and act is not None):
            return None
        return ProjectorMLP(first, act, second)

    def project(self, tokens: TokenState) -> TokenState:
        projector = self.model.model.multi_modal_projector
        return tokens.to_space(projector(tokens.embeddings), "llm")

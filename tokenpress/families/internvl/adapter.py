"""InternVL (``transformers.InternVLForConditionalGeneration``, model_type ``internvl``): InternViT tiles,
pixel shuffle, an MLP projector, and the text model its ``text_config`` names (Qwen2 in InternVL3).

* **Tiles.** The processor cuts an image into 448-pixel tiles (crops row-major, then a thumbnail of the
  whole image when there is more than one crop) and gives the model one flat ``pixel_values``: no image
  size, no tile grid. What an image is comes only from its placeholders: every ``<img>...</img>`` run of
  ``image_token_id`` holds ``tokens per tile x tiles``. Each tile is one :class:`~tokenpress.TokenState`
  row with its own grid (1, s/2, s/2); each run is one image whose rows are its tiles, in order. A video
  frame is a run of one tile. Cross-tile methods therefore see tiles as separate images.
* **Encoder space.** The model drops InternViT's class token, pixel-shuffles the s x s patch grid into
  2x2 units (4C wide: patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) side by side) and projects
  each unit (LayerNorm over the whole 4C unit, then the MLP). A token in encoder space is one such unit,
  in that channel order, so the ``projector`` point sees exactly what the model's projector takes.
* **Signals** (InternViT has a class token): ``cls_attention``, ``attention_received`` and ``keys``,
  recomputed from a block's own ``layernorm_before``, ``q_proj``/``k_proj`` and, with ``use_qk_norm``, its
  ``q_norm``/``k_norm`` (over the full width, before the heads split). They are per patch, then laid out
  like the features: a unit's attention is the sum over its patches, its keys are its patches' keys side by
  side in the unit's channel order.
* **No stage inside the encoder**: the pixel-shuffle projector needs every 2x2 patch unit whole.
* **Decoder**: Llama-style, 1-D RoPE (the base adapter's defaults); a Qwen3 text model's q/k norms are
  picked up by the base ``attention_parts``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys, Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.internvl.costs import InternVLCosts, unit_side
from tokenpress.runtime.adapter import ImageSpan, ModelAdapter, ProjectorMLP
from tokenpress.runtime.encoder import InsideEncoder, attention_received


def group_units(patches: torch.Tensor, side: int, unit: int) -> torch.Tensor:
    """(I, side*side, ...) raster patches -> (I, (side/unit)^2, unit*unit*...): each unit x unit block of the
    patch grid side by side, in raster order of the units, the block's patches in raster order within it
    (InternVL's ``pixel_shuffle`` channel order)."""
    images, rest = patches.shape[0], patches.shape[2:]
    cells = side // unit
    grid = patches.reshape(images, cells, unit, cells, unit, *rest)
    grid = grid.transpose(2, 3)  # (I, unit row, unit col, row in unit, col in unit, ...)
    return grid.reshape(images, cells * cells, -1)


class InternVLAdapter(ModelAdapter):
    """Adapter for ``InternVLForConditionalGeneration`` (images and video frames as tiles)."""

    family = "internvl"
    signals = ("cls_attention", "keys", "attention_received")  # per tile, summed / set side by side per unit
    cost_model = InternVLCosts
    test_family = "tokenpress.families.internvl.testbed:INTERNVL"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "internvl" and hasattr(model, "model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                "the internvl adapter needs vision_feature_select_strategy='default' (the patch grid without the "
                f"class token, what the pixel shuffle needs), this model has {config.vision_feature_select_strategy!r}")
        if not isinstance(config.vision_feature_layer, int):
            raise UnsupportedModelError(
                "the internvl adapter needs one vision_feature_layer (InternVL reads a single layer's features), "
                f"this model has {config.vision_feature_layer!r}")
        self.unit = unit_side(config)

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def _encoder_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layer

    def num_encoder_layers(self) -> int:
        return len(self._encoder_layers())

    def encoder_stages_refusal(self) -> str:
        return ("InternVL's pixel-shuffle projector needs every 2x2 patch unit whole, so tokens cannot change "
                "between its encoder blocks; merge after the encoder instead")

    # --- pre-LLM --------------------------------------------------------------------------------

    def tile_side(self, pixel_values: torch.Tensor) -> int:
        """Patches per side of the tiles in ``pixel_values`` (square, a whole number of units per side: what
        the model's own reshape and pixel shuffle need)."""
        patch = self.model.config.vision_config.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        height, width = (int(size) for size in pixel_values.shape[-2:])
        side = height // patch_h
        if side != width // patch_w or side % self.unit:
            raise CompressionError(f"InternVL tiles must be square with a whole number of {self.unit}x{self.unit} "
                                   f"patch units per side; got {height}x{width} pixels of {patch_h}x{patch_w} "
                                   "patches")
        return side

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: InsideEncoder | None = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        pixel_values = inputs["pixel_values"]
        side = self.tile_side(pixel_values)
        config = self.model.config
        layer = config.vision_feature_layer
        keyed = list(dict.fromkeys(requests))
        hidden_wanted = layer != -1 or bool(keyed)
        outputs = self.vision_tower(pixel_values=pixel_values.to(dtype=self.inner_module().dtype),
                                    output_hidden_states=hidden_wanted, return_dict=True)
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        units = group_units(features[:, 1:], side, self.unit)  # the class token dropped, as "default" does
        cells = side // self.unit
        tokens = TokenState.from_dense(units, (1, cells, cells))
        found = {}
        layers = self._encoder_layers()
        for request in keyed:
            index = request.layer % len(layers)
            value = internvit_signal(layers[index], outputs.hidden_states[index], request)
            found[request] = group_units(value, side, self.unit) if value.dim() == 3 else \
                group_units(value.unsqueeze(-1), side, self.unit).sum(-1)
        return tokens, found

    def encoder_width(self) -> int:
        """A token in encoder space is one pixel-shuffle unit: its 2x2 patches' features side by side (4C)."""
        return int(self.model.model.multi_modal_projector.linear_1.in_features)

    def encoder_heads(self) -> int:
        return int(self.model.config.vision_config.num_attention_heads)

    def projector_mlp(self) -> ProjectorMLP | None:
        """``linear_2(act(linear_1(layer_norm(unit))))``: the LayerNorm covers the whole 4C unit."""
        projector = self.model.model.multi_modal_projector
        first, act, second, norm = (getattr(projector, name, None) for name in ("linear_1", "act", "linear_2",
                                                                                 "layer_norm"))
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and act is not None):
            return None
        return ProjectorMLP(first, act, second, norm=norm, norm_width=first.in_features if norm is not None else None)

    def project(self, tokens: TokenState) -> TokenState:
        projector = self.model.model.multi_modal_projector
        return tokens.to_space(projector(tokens.embeddings), "llm")

    # --- sequence -------------------------------------------------------------------------------

    def image_spans(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState) -> list[ImageSpan]:
        """One image per run of placeholders; its tiles (TokenState rows, in ``pixel_values`` order) are
        ``run length / tokens per tile``. Runs follow one another in the text's order, as the tiles do."""
        if tokens.known_grid is not None:
            per_tile = [t * h * w for t, h, w in tokens.known_grid]
        else:
            per_tile = tokens.original_grid.prod(-1).tolist()
        is_image = ((input_ids == self.image_token_id) & valid).tolist()
        spans: list[ImageSpan] = []
        row = 0
        for sample, columns in enumerate(is_image):
            column = 0
            while column < len(columns):
                if not columns[column]:
                    column += 1
                    continue
                end = column
                while end < len(columns) and columns[end]:
                    end += 1
                length, tiles, filled = end - column, 0, 0
                while filled < length and row + tiles < len(per_tile):
                    filled += int(per_tile[row + tiles])
                    tiles += 1
                if filled != length:
                    raise CompressionError(
                        f"a run of {length} image placeholders is not a whole number of the tiles given "
                        f"({int(per_tile[0]) if per_tile else 0} tokens each, {len(per_tile) - row} left)")
                spans.append(ImageSpan(sample, column, length, len(spans), tuple(range(row, row + tiles))))
                row += tiles
                column = end
        if row != len(per_tile):
            raise CompressionError(f"{len(per_tile)} tiles were given but the prompt has placeholders for {row}")
        return spans


def internvit_signal(block: nn.Module, layer_input: torch.Tensor, request: Signal) -> torch.Tensor:
    """One requested signal of an InternViT block on its input (the class token at slot 0), per patch
    (class token removed): (I, P) attention or (I, P, C') keys. Recomputed from the block's own
    ``layernorm_before``, ``q_proj``/``k_proj`` and ``q_norm``/``k_norm`` (identity without ``use_qk_norm``; over
    the full width, before the heads split, as the block applies them); no N x N matrix is formed."""
    attention = block.attention
    normed = block.layernorm_before(layer_input)
    images, length, width = normed.shape
    heads = attention.num_heads
    if isinstance(request, EncoderKeys):
        keys = attention.k_norm(attention.k_proj(normed))[:, 1:]
        return keys.unflatten(-1, (heads, -1)).mean(-2) if request.heads == "mean" else keys
    count, head_dim, scale = ((heads, attention.head_dim, attention.scale) if request.heads == "mean"
                              else (1, width, width ** -0.5))
    key = attention.k_norm(attention.k_proj(normed)).view(images, length, count, head_dim).transpose(1, 2)
    if isinstance(request, ClsAttention):
        query = attention.q_norm(attention.q_proj(normed[:, :1])).view(images, 1, count, head_dim).transpose(1, 2)
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0, 1:]
    if isinstance(request, AttentionReceived):
        query = attention.q_norm(attention.q_proj(normed)).view(images, length, count, head_dim).transpose(1, 2)
        return attention_received(query, key, scale)[:, 1:]
    raise ValueError(f"InternViT does not compute {request.describe()}")

"""Gemma 3 (``transformers.Gemma3ForConditionalGeneration``): a SigLIP encoder, a parameter-free average pool
with an RMSNorm and a projection, and a Gemma 3 decoder of sliding-window and full layers in which the tokens
of one image attend to each other both ways.

* Encoder: SigLIP (no class token). Its features (after ``post_layernorm``) are average-pooled in the
  projector's fixed cells (4x4 patches of a 64x64 grid: 256 tokens per image) as part of the encoder output:
  tokenpress sees the pooled grid (16x16), in the encoder's width, so a token means the same cell before and
  after the projector. Signals ``keys`` and ``attention_received`` are computed over the patches and averaged
  over each pooled cell, to line up with the tokens.
* ``projector``: the RMSNorm and the matrix product, per token, in the model's own order (pool, norm,
  product), so identity holds bit for bit. It is not a two-layer MLP, so ``projector_mlp()`` is None and the
  methods that replace the projector have nothing to copy: ``pixel_unshuffle`` (``init: auto`` falls back to
  ``random``; ``init: projector`` is refused), ``ldp`` and ``qformer`` start from a seeded random
  Linear-GELU-Linear instead of the model's norm and projection. Unfitted, their visual tokens therefore
  differ from the model's (without its RMSNorm): fit them (``tokenpress fit``) before judging them. They act
  on the pooled 16x16 grid (encoder width), not on the 64x64 patches.
* Stages inside the encoder (ToMe, FOLDER with encoder blocks) are refused: the pool needs the full patch
  grid. Listed without blocks, they run once after the encoder, on the pooled tokens.
* Sequence: each image and each pan-and-scan crop is its own span of ``mm_tokens_per_image`` placeholders
  (between ``<start_of_image>`` and ``<end_of_image>``). Text embeddings are scaled by sqrt(hidden size),
  visual tokens are not (as in the model).
* Attention: when the call carries ``token_type_ids`` (as the processor's output does), the tokens laid out
  in one image's placeholders - the kept or merged ones - attend to each other both ways; without it the
  attention is causal, as the model's. Sliding layers add a window on positions: a key is seen when
  ``position(query) - position(key) < sliding_window``; with ``positions: original`` the tokens left after
  a compression see their original neighbourhood, with ``compact`` the compacted one. Decoding steps and the
  scorer apply the same masks (the compressed cache keeps every key; the window comes from the mask): a
  score read in a sliding layer (FastV at a layer after one) ranks only the keys within the query's window.
  FlashAttention is refused (it takes no mask beyond padding, so the image blocks would be lost).
* Rotary tables per layer type (``sliding_attention``: local theta, ``full_attention``: global theta and
  the checkpoint's scaling); the attention scale is ``query_pre_attn_scalar ** -0.5``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import CompressionError, UnsupportedModelError
from tokenpress.core.signals import Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.clip import clip_signals
from tokenpress.families.gemma3.costs import Gemma3Costs
from tokenpress.runtime import compat
from tokenpress.runtime.adapter import ImageSpan, ModelAdapter
from tokenpress.runtime.sequence import Sequence


class Gemma3Adapter(ModelAdapter):
    """Adapter for ``Gemma3ForConditionalGeneration`` (images and pan-and-scan crops)."""

    family = "gemma3"
    extra_inputs = ("token_type_ids",)
    signals = ("keys", "attention_received")  # over the patches, averaged over each pooled cell
    no_signals_because = ("its SigLIP encoder has no class token; a method may ask for the attention each patch "
                          "receives instead, ClsAttention(class_free='received')")
    cost_model = Gemma3Costs
    test_family = "tokenpress.families.gemma3.testbed:GEMMA3"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "gemma3" and hasattr(model, "model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        text = self.text_config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError("this Gemma 3 text config sets use_bidirectional_attention, which makes all "
                                        "text attend both ways; tokenpress runs Gemma 3's causal decoder only")
        if getattr(text, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError("this Gemma 3 text config soft-caps its attention logits, which tokenpress's "
                                        "scorer does not reproduce (Gemma 3 checkpoints do not soft-cap)")
        projector = self.projector
        if projector.patches_per_image != projector.kernel_size * projector.tokens_per_side:
            raise UnsupportedModelError(
                f"this Gemma 3 config pools {projector.patches_per_image}x{projector.patches_per_image} patches into "
                f"{projector.tokens_per_side}x{projector.tokens_per_side} tokens, not a whole number of patches each")

    # --- modules --------------------------------------------------------------------------------

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def _encoder_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def num_encoder_layers(self) -> int:
        return len(self._encoder_layers())

    def encoder_stages_refusal(self) -> str:
        projector = self.projector
        side, kernel = projector.patches_per_image, projector.kernel_size
        return (f"Gemma 3's projector average-pools the encoder's full {side}x{side} patch grid in fixed "
                f"{kernel}x{kernel} cells, so tokens cannot change between its encoder blocks; compress after "
                "the encoder instead")

    def check_transformers_features(self) -> None:
        super().check_transformers_features()
        implementation = self.attention_implementation
        if implementation.startswith("flash"):
            raise UnsupportedModelError(
                f"Gemma 3 cannot be compressed with {implementation}: FlashAttention takes no mask beyond padding, "
                "so it would drop the bidirectional attention among each image's tokens; use sdpa or eager")
        rotary = inspect.signature(type(self.language_model.rotary_emb).forward).parameters
        layer_types = getattr(self.text_config, "layer_types", None)
        if "layer_type" not in rotary or not layer_types:
            raise UnsupportedModelError(
                "this Gemma 3 has no per-layer-type rotary embedding (rotary_emb(x, position_ids, layer_type) and "
                f"text_config.layer_types), which tokenpress needs (transformers {compat.transformers_version()}; "
                f"tested: {compat.TESTED_TRANSFORMERS})")

    # --- pre-LLM --------------------------------------------------------------------------------

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: Any = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        """SigLIP's features, average-pooled in the projector's cells (the model's own pool, on the model's own
        layout), as one (1, s, s) grid per image or crop; each signal averaged over the same cells."""
        pixel_values = inputs["pixel_values"]
        outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=bool(requests), return_dict=True)
        pooled = self._pool(outputs.last_hidden_state)
        side = self.projector.tokens_per_side
        tokens = TokenState.from_dense(pooled, (1, side, side))
        found = clip_signals(self._encoder_layers(), outputs.hidden_states, requests, class_token=False) \
            if requests else {}
        self.media = {"token_type_ids": inputs.get("token_type_ids")}
        return tokens, {request: self._cell_mean(value) for request, value in found.items()}

    def _pool(self, features: torch.Tensor) -> torch.Tensor:
        """(I, P, C) patch features -> (I, T, C) pooled tokens, exactly as the projector pools before its norm."""
        projector = self.projector
        images, _, width = features.shape
        side = projector.patches_per_image
        grid = features.transpose(1, 2).reshape(images, width, side, side).contiguous()
        return projector.avg_pool(grid).flatten(2).transpose(1, 2).contiguous()

    def _cell_mean(self, values: torch.Tensor) -> torch.Tensor:
        """(I, P[, C]) per patch, raster order -> (I, T[, C]): the mean over each pooled cell's patches."""
        projector = self.projector
        kernel, side = projector.kernel_size, projector.tokens_per_side
        images, rest = values.shape[0], values.shape[2:]
        cells = values.reshape(images, side, kernel, side, kernel, *rest).mean(dim=(2, 4))
        return cells.reshape(images, side * side, *rest)

    def project(self, tokens: TokenState) -> TokenState:
        """The projector after its pool: RMSNorm and the projection of each token (no activation). The tokens are
        laid out in memory as the model's pool leaves them (channel-major per image: the norm's reduction over
        the channels then adds in the model's order), so the arithmetic is the model's, bit for bit, whatever
        stage selected them."""
        projector = self.projector
        laid_out = tokens.embeddings.transpose(1, 2).contiguous().transpose(1, 2)
        normed = projector.mm_soft_emb_norm(laid_out)
        projected = torch.matmul(normed, projector.mm_input_projection_weight).type_as(tokens.embeddings)
        return tokens.to_space(projected, "llm")

    def encoder_width(self) -> int:
        return int(self.projector.mm_input_projection_weight.shape[0])

    def encoder_heads(self) -> int:
        return int(self.model.config.vision_config.num_attention_heads)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled text embeddings; an image id outside the vocabulary is looked up as 0 (as the model does)."""
        if self.image_token_id >= self.text_config.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return super().embed(input_ids)

    def image_spans(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState) -> list[ImageSpan]:
        """One span per image or crop. With ``token_type_ids``, which must mark exactly the placeholders, each run
        of marked tokens is one bidirectional block (adjacent images, with nothing between them, share one, as in
        the model): kept in :attr:`media` for the masks."""
        spans = super().image_spans(input_ids, valid, tokens)
        self.media["columns"] = int(input_ids.shape[1])
        token_types = self.media.get("token_type_ids")
        self.media["blocks"] = None
        if token_types is None:
            return spans
        token_types = torch.as_tensor(token_types, device=input_ids.device)
        placeholders = (input_ids == self.image_token_id) & valid
        if token_types.shape != input_ids.shape or not torch.equal((token_types == 1) & valid, placeholders):
            raise CompressionError("token_type_ids must be 1 exactly on the image placeholder tokens (as Gemma 3's "
                                   "processor makes them): tokenpress lays out each image's attention block from its "
                                   "placeholders")
        blocks = list(range(tokens.num_images))
        by_sample: dict[int, list[ImageSpan]] = {}
        for span in spans:
            by_sample.setdefault(span.sample, []).append(span)
        for sample_spans in by_sample.values():
            ordered = sorted(sample_spans, key=lambda span: span.start)
            for before, after in zip(ordered, ordered[1:], strict=False):
                if before.start + before.length == after.start:
                    blocks[after.image] = blocks[before.image]
        self.media["blocks"] = torch.tensor(blocks, dtype=torch.long, device=input_ids.device)
        return spans

    # --- decoder --------------------------------------------------------------------------------

    def _layer_type(self, layer: int) -> str:
        return self.text_config.layer_types[layer]

    def _window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (None: a full-attention layer)."""
        return self.text_config.sliding_window if self._layer_type(layer) == "sliding_attention" else None

    def position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor,
                            layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, positions[0], self._layer_type(layer))

    def _token_blocks(self, sequence: Sequence) -> torch.Tensor | None:
        """(B, N) the bidirectional block of each token (-1: none), or None when the call carried no
        ``token_type_ids`` (plain causal attention, as the model's)."""
        blocks = self.media.get("blocks")
        if blocks is None or sequence.block is None:
            return None
        image = sequence.block
        return torch.where(image >= 0, blocks.to(image.device)[image.clamp_min(0)], -1)

    def _mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, Q, K) in the form the attention implementation takes: bool for sdpa, additive for eager."""
        if self.attention_implementation == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def layer_mask(self, layer: int, sequence: Sequence) -> torch.Tensor | None:
        """Real keys, causal or in the query's image block (with ``token_type_ids``), and on a sliding layer
        within the window of positions."""
        blocks = self._token_blocks(sequence)
        window = self._window(layer)
        if window is not None and self.media.get("columns", window) < window:
            window = None  # no two positions of this prompt are that far apart
        if blocks is None and window is None:
            return super().layer_mask(layer, sequence)
        slots = torch.arange(sequence.length, device=sequence.valid.device).expand(sequence.batch_size, -1)
        positions = sequence.positions[0]
        allowed = attention_allowed(sequence.valid, positions, blocks, slots, positions, blocks, window)
        return self._mask(allowed.unsqueeze(1), sequence.hidden.dtype)

    def decode_mask(self, layer: int, key_valid: torch.Tensor, key_positions: torch.Tensor,
                    positions: torch.Tensor, dtype: torch.dtype, padded: bool | None) -> torch.Tensor | None:
        """New text tokens see every earlier real key (an image block lies wholly before them), within the window
        of positions on a sliding layer (the compressed cache keeps every key)."""
        window = self._window(layer)
        if window is None:
            return super().decode_mask(layer, key_valid, key_positions, positions, dtype, padded)
        if key_positions is None:
            raise CompressionError("this compressed cache does not know its keys' positions, which Gemma 3's sliding "
                                   "layers need; run the prompt again")
        count, total = positions.shape[-1], key_valid.shape[1]
        slots = torch.arange(total - count, total, device=key_valid.device).expand(key_valid.shape[0], -1)
        allowed = attention_allowed(key_valid, key_positions[0], None, slots, positions[0], None, window)
        return self._mask(allowed.unsqueeze(1), dtype)

    def score_allowed(self, layer: int, sequence: Sequence, query_index: torch.Tensor) -> torch.Tensor:
        blocks = self._token_blocks(sequence)
        positions = sequence.positions[0]
        query_blocks = None if blocks is None else torch.gather(blocks, 1, query_index)
        query_positions = torch.gather(positions, 1, query_index)
        return attention_allowed(sequence.valid, positions, blocks, query_index, query_positions, query_blocks,
                                 self._window(layer))


def attention_allowed(key_valid: torch.Tensor, key_positions: torch.Tensor, key_blocks: torch.Tensor | None,
                      query_slots: torch.Tensor, query_positions: torch.Tensor, query_blocks: torch.Tensor | None,
                      window: int | None) -> torch.Tensor:
    """(B, Q, K) bool: the keys each query sees in a Gemma 3 layer. A real key is seen when it comes no later than
    the query (slot order) or lies in the query's image block (``*_blocks`` >= 0; None: no blocks), and, with a
    ``window``, when ``query position - key position < window`` (a lower bound only: a block's later tokens
    stay visible, as in the model)."""
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    seen = key_slots.view(1, 1, -1) <= query_slots.unsqueeze(-1)
    if key_blocks is not None and query_blocks is not None:
        seen = seen | ((query_blocks.unsqueeze(-1) == key_blocks.unsqueeze(1)) & (query_blocks.unsqueeze(-1) >= 0))
    allowed = key_valid.unsqueeze(1) & seen
    if window is not None:
        allowed = allowed & (key_positions.unsqueeze(1) > query_positions.unsqueeze(-1) - window)
    return allowed

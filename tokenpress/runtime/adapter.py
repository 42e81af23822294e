"""The model-adapter contract: everything model-specific lives in a subclass of :class:`ModelAdapter`.

An adapter finds a model's modules, turns pixels into a :class:`~tokenpress.TokenState`, applies
the projector, lays out the compressed sequence (placeholders, padding, positions), and runs the
decoder layers one at a time so that the token set may change between layers. The defaults here
fit Llama-style decoders (``layers``, ``norm``, ``rotary_emb``, ``embed_tokens``; layers with
``input_layernorm`` and ``self_attn.q_proj/k_proj``); a family overrides what differs.

A third party adds a family by subclassing this and returning the class from the
``tokenpress_register_adapters`` hook. The family brings its FLOPs model with it
(:attr:`ModelAdapter.cost_model`) and names its tiny test model (:attr:`ModelAdapter.test_family`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tokenpress.core.errors import CompressionError
from tokenpress.core.signals import Signal, served_request
from tokenpress.core.tokens import TokenState
from tokenpress.runtime import compat
from tokenpress.runtime.sequence import Sequence, attention_mask_for

if TYPE_CHECKING:
    from tokenpress.core.flops import FamilyCosts
    from tokenpress.runtime.encoder import InsideEncoder


@dataclass(frozen=True)
class AttentionParts:
    """The pieces of a decoder layer's attention the scorer recomputes rows from."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass
class ImageSpan:
    """A run of image placeholder columns in one row of ``input_ids``."""

    sample: int
    start: int
    length: int
    image: int  # index of the image in the batch
    rows: tuple[int, ...] = ()  # its TokenState rows (default: row ``image``)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = (self.image,)


@dataclass
class ImageLayout:
    """How one image's kept tokens enter the sequence: in order, with positions (R rows).

    ``sources`` index the visual bank: ``row * slots + slot`` for a TokenState token, or
    ``-1 - k`` for the adapter's extra embedding k (e.g. LLaVA-NeXT's image newline).
    """

    sources: list[int]
    positions: list[list[int]]
    next_position: int


@dataclass(frozen=True)
class ProjectorMLP:
    """A projector ``second(act(first(norm_each(x))))``: ``norm`` (if any) normalises each
    ``norm_width``-wide chunk of the token (one patch of a merged unit) before ``first``."""

    first: Any  # nn.Linear
    act: Any
    second: Any  # nn.Linear
    norm: Any = None
    norm_width: int | None = None


class ModelAdapter:
    """Base class of model-family adapters.

    Subclasses set ``family`` and implement :meth:`supports`, :meth:`encode_images`,
    :meth:`project` and :meth:`inner_module`; they override the sequence and
    decoder helpers where their model differs from a Llama-style decoder.
    """

    family: ClassVar[str] = ""
    #: Number of position rows: 1 for 1-D RoPE, 3 for M-RoPE.
    position_rank: ClassVar[int] = 1
    #: Keyword arguments of the model's forward, besides its media, that the family reads at prefill (in
    #: :attr:`media` from :meth:`encode_images` on): Gemma 3's ``token_type_ids``.
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: Names of the encoder signals the family can provide (:mod:`tokenpress.core.signals`), e.g. ("cls_attention",).
    signals: ClassVar[tuple[str, ...]] = ()
    #: Why the family provides none or only some of them (said when a request is refused).
    no_signals_because: ClassVar[str] = ""
    #: The family's prefill FLOPs model (``tokenpress flops``, ``eval``'s FLOPs); None: not covered.
    cost_model: ClassVar[type[FamilyCosts] | None] = None
    #: ``"module:attribute"`` of the family's :class:`~tokenpress.testing.families.Family` (its tiny
    #: test model), imported only by the testing suites; None: no tiny model.
    test_family: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._calls = threading.local()

    @property
    def media(self) -> dict[str, Any]:
        """What :meth:`encode_images` learned about the current prefill's media that only this adapter
        reads later in the same prefill (Qwen2.5-VL: which rows are videos, their time intervals): kept
        out of the stages' :class:`TokenState`, and per thread, since threads may share one model."""
        media = getattr(self._calls, "media", None)
        if media is None:
            media = self._calls.media = {}
        return media

    @media.setter
    def media(self, value: dict[str, Any]) -> None:
        self._calls.media = value

    # --- identification -------------------------------------------------------------------------

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def inner_module(self) -> nn.Module:
        """The module whose ``forward`` is taken over while attached (instance attribute only). Default:
        ``model.model``, where every transformers 5 ``*ForConditionalGeneration`` keeps it."""
        return self.model.model

    # --- modules --------------------------------------------------------------------------------

    @property
    def language_model(self) -> nn.Module:
        """The decoder. Default: the inner module's ``language_model``, as transformers 5 names it."""
        return self.inner_module().language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def attention_implementation(self) -> str:
        return self.text_config._attn_implementation or "eager"

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def placeholder_ids(self) -> tuple[int, ...]:
        """Token ids that stand for visual tokens in ``input_ids`` (images, videos...)."""
        return (self.image_token_id,)

    def num_encoder_layers(self) -> int:
        return 0

    def feature_blocks(self) -> int | None:
        """How many encoder blocks feed the features the model projects (the last of them produces
        them), for stages acting inside the encoder; ``None`` when the family runs no stage there."""
        return None

    def encoder_stages_refusal(self) -> str:
        """Why this model runs no stage inside its vision encoder (said when a stack asks it to)."""
        return f"the {self.family} adapter cannot run stages inside its vision encoder"

    def check_encoder_blocks(self, blocks: tuple[int, ...]) -> str | None:
        """Why a stage cannot act inside these encoder blocks (None when it can)."""
        count = self.feature_blocks()
        if count is None:
            return self.encoder_stages_refusal()
        outside = [block for block in blocks if not 0 <= block < count]
        if outside:
            return (f"encoder block {outside[0]} does not feed the features: this model's features come out of "
                    f"encoder block {count - 1} (blocks 0-{count - 1})")
        return None

    def check_transformers_features(self) -> None:
        """Raise :class:`~tokenpress.core.errors.UnsupportedModelError` naming the first transformers feature
        this adapter relies on that the installed release lacks (checked at attach time, before
        anything is touched). Families that rely on more extend it."""
        compat.cache_argument(self.inner_module())
        compat.cache_field(compat.output_class(self.inner_module()))
        for layer in self.layers:
            compat.cache_argument(layer)

    @property
    def has_class_token(self) -> bool:
        """Whether the vision encoder has a class token (it serves ``cls_attention``)."""
        return "cls_attention" in self.signals

    def served_signal(self, request: Signal) -> Signal:
        """The request this family computes for ``request`` (a class-token attention asked with
        ``class_free="received"`` is the attention each patch receives on an encoder without one)."""
        return served_request(request, self.has_class_token)

    def check_signal(self, request: Signal) -> str | None:
        """Why the signal request cannot be served (None when it can): a signal the family does not
        compute (:attr:`signals`, or :attr:`no_signals_because`), or a layer its encoder does not have."""
        request = self.served_signal(request)
        if request.name not in self.signals:
            why = f" ({self.no_signals_because})" if self.no_signals_because else ""
            return f"the {self.family} adapter cannot provide the encoder signal {request.name!r}{why}"
        count = self.num_encoder_layers()
        if not -count <= request.layer < count:
            return f"{request.name} layer {request.layer!r} is out of range for a {count}-layer vision encoder"
        return None

    # --- pre-LLM --------------------------------------------------------------------------------

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: InsideEncoder | None = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        """Run the vision encoder: the patch features (encoder space) and each requested signal
        (:mod:`tokenpress.core.signals`), rows and patches laid out as the features are.

        ``inside`` (only where :meth:`feature_blocks` is not None) runs stages inside the blocks it
        lists (:mod:`tokenpress.runtime.encoder`); the adapter then records the token count each block saw
        in ``self.media["encoder_run"]`` (an :class:`~tokenpress.runtime.encoder.EncoderRun`)."""
        raise NotImplementedError

    def project(self, tokens: TokenState) -> TokenState:
        """Apply the model's projector to tokens in encoder space."""
        raise NotImplementedError

    def projector_mlp(self) -> ProjectorMLP | None:
        """The model's projector when it is a two-layer MLP on each encoder-space token (optionally
        after a norm of each of its patches: Qwen2.5-VL's merger), else ``None``: what a method that
        replaces the projector may start from."""
        return None

    def encoder_width(self) -> int:
        """Width of a token in encoder space (what the model's projector takes): a method that
        replaces the projector maps this width to ``text_config.hidden_size``."""
        raise NotImplementedError

    def encoder_heads(self) -> int:
        """Attention heads of the vision encoder (a key averaged over them is ``width / heads`` wide)."""
        return 1

    def encoder_pixels(self, inputs: dict[str, Any], image: int) -> torch.Tensor:
        """Image ``image``'s pixels as the encoder saw them, (3, H, W), still normalised by the
        processor, covering the patch grid of that image's first :class:`TokenState` row (what
        ``tokenpress viz`` draws under the patches). Default: ``pixel_values[image]``."""
        return inputs["pixel_values"][image]

    def view_size(self, inputs: dict[str, Any], image: int) -> tuple[int, int]:
        """(height, width) at which the picture of :meth:`encoder_pixels` has the proportions of what it
        shows (``tokenpress viz`` draws its panels so). Default: the picture's own size (it kept its
        proportions: resized, cropped or both); a family that squeezes a whole image into a square tile
        (LLaVA-NeXT's base tile) gives the image's own size."""
        height, width = (int(side) for side in self.encoder_pixels(inputs, image).shape[-2:])
        return height, width

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def image_spans(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState) -> list[ImageSpan]:
        """Runs of placeholder columns, one per image, in the order the images were given."""
        return self._spans_for(input_ids, valid, tokens, self.image_token_id)

    def _spans_for(self, input_ids: torch.Tensor, valid: torch.Tensor, tokens: TokenState,
                   token_id: int) -> list[ImageSpan]:
        """Split the runs of ``token_id`` into one span per image of ``tokens`` (adjacent images share a run)."""
        spans: list[ImageSpan] = []
        is_image = ((input_ids == token_id) & valid).tolist()
        per_image = tokens.original_grid.prod(-1).tolist()
        image = 0
        for sample, row in enumerate(is_image):
            column = 0
            while column < len(row):
                if not row[column]:
                    column += 1
                    continue
                end = column
                while end < len(row) and row[end]:
                    end += 1
                while column < end:
                    if image >= len(per_image):
                        raise CompressionError("the prompt has more image placeholders than images were given")
                    length = int(per_image[image])
                    if column + length > end:
                        raise CompressionError(
                            f"image {image} needs {length} placeholder tokens but its run has {end - column}"
                        )
                    spans.append(ImageSpan(sample, column, length, image))
                    column += length
                    image += 1
        if image != len(per_image):
            raise CompressionError(f"{len(per_image)} images were given but the prompt has placeholders for {image}")
        return spans

    def text_positions(self, start: int, count: int) -> list[list[int]]:
        """Positions (R rows) of ``count`` text tokens starting at scalar position ``start``."""
        return [list(range(start, start + count))] * self.position_rank

    def extra_embeddings(self) -> torch.Tensor | None:
        """Embeddings (E, D) the layout may insert besides the visual tokens (None: none)."""
        return None

    def layout_image(self, span: ImageSpan, tokens: TokenState, start: int, compact: bool) -> ImageLayout:
        """Place an image's kept tokens (all its TokenState rows, in order) from scalar position ``start``."""
        sources: list[int] = []
        positions: list[list[int]] = [[] for _ in range(self.position_rank)]
        for row in span.rows:
            picks = torch.nonzero(tokens.valid[row]).flatten()
            pos, start = self.image_positions(start, tokens, row, picks, compact)
            sources += (row * tokens.num_slots + picks).tolist()
            for r in range(self.position_rank):
                positions[r] += pos[r]
        return ImageLayout(sources, positions, start)

    def image_positions(
        self, start: int, tokens: TokenState, image: int, slots: torch.Tensor, compact: bool
    ) -> tuple[list[list[int]], int]:
        """Positions (R rows) of the kept tokens ``slots`` of TokenState row ``image``, and the next position.

        Default (1-D RoPE): ``original`` puts a token at ``start + grid_index`` and the image takes
        its whole current grid, its summary tokens (no cell) following it one after another;
        ``compact`` numbers the kept tokens one after another.
        """
        if compact:
            return [list(range(start, start + len(slots)))], start + len(slots)
        cells = int(tokens.grid[image].prod())
        grid_index = tokens.grid_index[image, slots]
        after, end = summary_positions(grid_index, start + cells)
        return [torch.where(grid_index >= 0, grid_index + start, after).tolist()], end

    def compact_positions(self, sequence: Sequence) -> torch.Tensor:
        """Re-index the sequence's positions one after another (``positions: compact``)."""
        ranks = torch.cumsum(sequence.valid.long(), dim=-1) - 1
        first = torch.where(sequence.valid.unsqueeze(0), sequence.positions, torch.iinfo(torch.long).max)
        base = first.amin(dim=(0, 2))  # keeps a row's starting offset
        ranks = (ranks + base.unsqueeze(1)).clamp_min(0)
        return ranks.unsqueeze(0).expand(self.position_rank, -1, -1).contiguous()

    def build_sequence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        tokens: TokenState,
        prompt_length: int,
        compact: bool,
        spans: list[ImageSpan] | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> Sequence:
        """Lay out each sample's text and (compressed) visual tokens, left-packed, with positions.

        ``spans`` (:meth:`image_spans` of these inputs) and ``text_embeds`` (``embed(input_ids)``), when the
        caller has them already, are not computed again."""
        batch, columns = input_ids.shape
        device = input_ids.device
        valid_in = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if spans is None:
            spans = self.image_spans(input_ids, valid_in, tokens)
        if text_embeds is None:
            text_embeds = self.embed(input_ids)
        slots = tokens.num_slots
        extra = self.extra_embeddings()
        visual_base = batch * columns
        extra_base = visual_base + tokens.num_images * slots

        rows: list[dict[str, list]] = []
        valid_cols = valid_in.tolist()
        spans_by_sample: dict[int, list[ImageSpan]] = {}
        for span in spans:
            spans_by_sample.setdefault(span.sample, []).append(span)
        for sample in range(batch):
            row = {"bank": [], "pos": [[] for _ in range(self.position_rank)], "visual": [], "prompt": [],
                   "column": [], "visual_id": [], "block": []}
            position = 0
            sample_spans = {span.start: span for span in spans_by_sample.get(sample, [])}
            column = 0
            while column < columns:
                span = sample_spans.get(column)
                if span is not None:
                    layout = self.layout_image(span, tokens, position, compact)
                    position = layout.next_position
                    count = len(layout.sources)
                    if count > span.length:
                        raise CompressionError(f"image {span.image} lays out {count} tokens in {span.length} "
                                               "placeholders")
                    row["bank"] += [visual_base + source if source >= 0 else extra_base - 1 - source
                                    for source in layout.sources]
                    for r in range(self.position_rank):
                        row["pos"][r] += layout.positions[r]
                    row["visual"] += [True] * count
                    row["prompt"] += [True] * count
                    row["column"] += list(range(span.start, span.start + count))
                    row["visual_id"] += [source if source >= 0 else -1 for source in layout.sources]
                    row["block"] += [span.image] * count
                    column += span.length
                    continue
                if valid_cols[sample][column]:
                    row["bank"].append(sample * columns + column)
                    pos = self.text_positions(position, 1)
                    for r in range(self.position_rank):
                        row["pos"][r] += pos[r]
                    position += 1
                    row["visual"].append(False)
                    row["prompt"].append(column < prompt_length)
                    row["column"].append(column)
                    row["visual_id"].append(-1)
                    row["block"].append(-1)
                column += 1
            rows.append(row)

        length = max(len(row["bank"]) for row in rows)
        def padded(key: str, fill: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([row[key] + [fill] * (length - len(row[key])) for row in rows], dtype=dtype,
                                device=device)

        parts = [text_embeds.reshape(batch * columns, -1),
                 tokens.embeddings.reshape(tokens.num_images * slots, -1).to(text_embeds.dtype)]
        if extra is not None:
            parts.append(extra.to(text_embeds.dtype))
        bank = torch.cat(parts)
        index = padded("bank", 0, torch.long)
        size_bank = torch.cat([torch.ones(batch * columns, device=device), tokens.size.reshape(-1).float().to(device),
                               torch.ones(0 if extra is None else extra.shape[0], device=device)])
        positions = torch.stack([
            torch.tensor([row["pos"][r] + [0] * (length - len(row["pos"][r])) for row in rows], dtype=torch.long,
                         device=device)
            for r in range(self.position_rank)
        ])
        valid = torch.arange(length, device=device).unsqueeze(0) < torch.tensor(
            [len(row["bank"]) for row in rows], device=device).unsqueeze(1)
        return Sequence(
            hidden=bank[index],
            positions=positions,
            valid=valid,
            is_visual=padded("visual", False, torch.bool),
            is_prompt=padded("prompt", False, torch.bool),
            column=padded("column", 0, torch.long),
            slot_id=torch.arange(length, device=device).expand(batch, -1).clone(),
            visual_id=padded("visual_id", -1, torch.long),
            block=padded("block", -1, torch.long),
            slot_count=length,
            lengths=tuple(len(row["bank"]) for row in rows),
            visual_lengths=tuple(sum(row["visual"]) for row in rows),
            size=size_bank[index],
        )

    # --- decoder --------------------------------------------------------------------------------

    def position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor,
                            layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the decoder's rotary embedding for ``positions`` (R, B, N) at decoder layer ``layer``
        (a family whose layers rotate differently, Gemma 3's sliding and full layers, reads it)."""
        return self.language_model.rotary_emb(hidden, positions[0])

    def rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor,
                      layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape (B, N, d) for :meth:`rotate` (the scorer's form; a family whose layers take
        another form converts here)."""
        return self.position_embeddings(hidden, positions, layer)

    def layer_mask(self, layer: int, sequence: Sequence) -> torch.Tensor | None:
        """The attention mask decoder layer ``layer`` gets at prefill over ``sequence`` (the tokens it
        processes, real ones left-packed), in the form its attention implementation expects (None: plain
        causal). Default: causal over the real tokens; a family whose layers attend otherwise (Gemma 3:
        an image's tokens among themselves, sliding windows) overrides it."""
        return attention_mask_for(self.attention_implementation, sequence.valid, sequence.length,
                                  sequence.hidden.dtype, padded=sequence.padded)

    def decode_mask(self, layer: int, key_valid: torch.Tensor, key_positions: torch.Tensor,
                    positions: torch.Tensor, dtype: torch.dtype, padded: bool | None) -> torch.Tensor | None:
        """The mask decoder layer ``layer`` gets for new tokens at ``positions`` (R, B, n) against its cache
        (``key_valid`` (B, S) and ``key_positions`` (R, B, S), the new tokens last). Default: causal over the
        real keys."""
        return attention_mask_for(self.attention_implementation, key_valid, positions.shape[-1], dtype,
                                  padded=padded)

    def score_allowed(self, layer: int, sequence: Sequence, query_index: torch.Tensor) -> torch.Tensor:
        """(B, R, N) bool: the slots of ``sequence`` each query slot ``query_index`` (B, R) sees at decoder
        layer ``layer`` (what the scorer masks its recomputed rows with). Default: causal over real tokens."""
        key_slot = torch.arange(sequence.length, device=query_index.device)
        return sequence.valid.unsqueeze(1) & (key_slot.view(1, 1, -1) <= query_index.unsqueeze(-1))

    def after_layer(self, layer: int, sequence: Sequence) -> Sequence:
        """The sequence after decoder layer ``layer`` at prefill (its hidden states as the layer output them,
        routed tokens back in place): a family whose model adds to the residual stream between layers
        (Qwen3-VL's DeepStack features at the visual positions) does it here. Default: unchanged."""
        return sequence

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
        """Apply rotary embedding (cos, sin of shape B, N, d) to x of shape (B, H, N, d), or (B, N, H, d)
        with ``heads_dim=2`` (the projections' own layout: the elementwise work then runs on contiguous
        memory instead of a transposed view)."""
        cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def attention_parts(self, layer_index: int) -> AttentionParts:
        layer = self.layers[layer_index]
        attention = layer.self_attn
        config = self.text_config
        return AttentionParts(
            input_norm=layer.input_layernorm,
            q_proj=attention.q_proj,
            k_proj=attention.k_proj,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            q_norm=getattr(attention, "q_norm", None),
            k_norm=getattr(attention, "k_norm", None),
        )

    def call_layer(
        self,
        layer_index: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
    ) -> torch.Tensor:
        """Run one decoder layer on packed hidden states; the layer appends its K/V to ``cache``."""
        return self._run_layer(layer_index, hidden, attention_mask, positions[0], position_embeddings, cache)

    def _run_layer(self, layer_index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   cache: Any) -> torch.Tensor:
        layer = self.layers[layer_index]
        output = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=cache is not None, position_embeddings=position_embeddings,
                       **{compat.cache_argument(layer): cache})
        return output[0] if isinstance(output, tuple) else output

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden)

    def make_output(self, last_hidden_state: torch.Tensor, cache: Any, image_features: list[torch.Tensor] | None,
                    position_offset: torch.Tensor) -> Any:
        """The output object the inner module's own forward would return (its declared class, with the
        fields this transformers release gives it).

        ``image_features`` are the visual tokens that entered the decoder, one tensor per sample
        (what the image placeholders held, LLaVA-NeXT's newlines included; None when decoding);
        ``position_offset`` (B,) is how far each sample's next text position is ahead of its number of
        real input tokens (what Qwen2.5-VL calls ``rope_deltas``).
        """
        return compat.build_output(compat.output_class(self.inner_module()), last_hidden_state, cache,
                                   image_features)


def summary_positions(grid_index: torch.Tensor, first: int) -> tuple[torch.Tensor, int]:
    """Positions of an image's summary tokens (``grid_index`` NO_CELL) one after another from
    ``first``, in slot order (other entries: ``first``), and the position after the last."""
    summary = grid_index < 0
    ranks = torch.cumsum(summary.long(), dim=0) - 1
    return first + ranks.clamp_min(0), first + int(summary.sum())

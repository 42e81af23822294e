"""Analytical prefill FLOPs of a vision-language model, with and without a compression stack.

**What "prefill FLOPs" counts** (per sample, one image per sample unless inputs say otherwise):

* the vision encoder (patch embedding and every encoder block: the model runs all of them even when
  it reads an earlier layer's features), over every tile the model encodes;
* the projector (LLaVA's 2-layer MLP, Qwen2.5-VL's patch merger) over the tokens it really sees
  (after a ``post_encoder`` stage, fewer);
* every decoder layer over the tokens it processes (text + visual, all of them, causally);
* the ``lm_head`` on the **last position only** (the logits a prefill needs: call the model with
  ``logits_to_keep=1`` to compare with a counter);
* the method's own scoring cost (FastV's scorer: the q projection of the query row(s), the k
  projection of the N tokens entering the scored layer and the rows x N attention logits), and the
  method's own modules at pre-LLM points (``ldp``'s convolutions, ``qformer``'s query blocks); a
  stage that replaces the projector is not charged the model's projector. Each method declares
  these through :class:`~tokenpress.Method` (``scoring_flops``, ``stage_flops``).

Counted like :class:`torch.utils.flop_counter.FlopCounterMode`: a multiply-add is 2 FLOPs and
only matrix products and convolutions count (norms, activations, softmax, rotary embeddings,
biases and embedding look-ups are free). Attention counts the whole query x key product, as eager
and SDPA kernels compute it: 4 * n * keys * heads * head_dim per layer. Padding is not counted:
each sample costs what it would cost alone, and only real tokens count (LLaVA-NeXT's compressed
forward also runs its projector over the slots that pad its base-tile row to the width of its
high-resolution row; torch's counter sees that work, this model does not).

Two ways to get the numbers:

* :func:`measured` - from the token counts of a real prefill (``handle.prefill_stats``) and its
  inputs (what ``tokenpress eval`` does);
* :func:`simulate` - from a config alone (no weights, no forward pass): the token count entering
  every layer is derived from each stage's promise (``expected_grid`` for re-gridding methods such
  as ``pool``, ``promised_count`` for the others, e.g. ``keep_count(n, keep_ratio)``).

What is particular to a family (its encoder, its projector, its encoder signals, the visual tokens its
decoder sees) is its :class:`FamilyCosts`, which its adapter names (``ModelAdapter.cost_model``): this
module finds it among the registered adapters by ``config.model_type``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenpress.core.errors import StackError, TokenpressError, UnsupportedModelError
from tokenpress.core.method import PRE_LLM_POINTS
from tokenpress.core.registry import get_registry
from tokenpress.core.signals import as_requests, served_request
from tokenpress.core.stack import load_stack

if TYPE_CHECKING:
    from tokenpress.core.stack import Stack, Stage
    from tokenpress.runtime.attach import Handle
    from tokenpress.runtime.interception import PrefillStats, StageRecord


class FlopsError(TokenpressError, ValueError):
    """The FLOPs of this model/stack cannot be derived (no promise, missing image size...)."""


# --- building blocks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder layer (and of the ``lm_head``)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    gated_mlp: bool = True
    vocab: int = 0
    #: Per-head norms on the projected queries and keys, before the rotation (Qwen3, Gemma 3): a scorer that
    #: folds the rotation into its projections cannot fold past them.
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config: Any, qk_norm: bool = False) -> DecoderShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   config.intermediate_size, config.num_hidden_layers, vocab=getattr(config, "vocab_size", 0) or 0,
                   qk_norm=qk_norm)

    def layer_flops(self, tokens: float, keys: float | None = None) -> float:
        """FLOPs of one layer processing ``tokens`` queries against ``keys`` keys (default: the same)."""
        keys = tokens if keys is None else keys
        q_and_o = 2 * 2 * tokens * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * 2 * tokens * self.hidden * self.kv_heads * self.head_dim
        attention = 2 * 2 * tokens * keys * self.heads * self.head_dim
        mlp = 2 * (3 if self.gated_mlp else 2) * tokens * self.hidden * self.intermediate
        return q_and_o + k_and_v + attention + mlp

    def lm_head_flops(self, positions: int = 1) -> float:
        """The output projection on ``positions`` positions."""
        return 2.0 * positions * self.hidden * self.vocab


def vit_block_flops(tokens: int, hidden: int, intermediate: int, gated: bool, attention_keys: float) -> float:
    """One ViT block: q, k, v, o projections, attention (``attention_keys`` = sum of tokens x keys) and MLP."""
    return 8.0 * tokens * hidden * hidden + 4.0 * attention_keys * hidden \
        + 2.0 * (3 if gated else 2) * tokens * hidden * intermediate


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

    def encoder_flops(self, patches: int) -> float:
        """One tile of ``patches`` patches (plus the CLS token) through the patch embedding and every block."""
        tokens = patches + 1
        embed = 2.0 * patches * self.patch_dim * self.hidden
        return embed + self.layers * vit_block_flops(tokens, self.hidden, self.intermediate, False, tokens * tokens)

    def encoder_run_flops(self, attention: list[int], mlp: list[int]) -> float:
        """One tile run block by block with stages inside: block b's attention over ``attention[b]``
        patch tokens, its MLP over ``mlp[b]`` (the CLS token added to both); only the blocks that ran."""
        embed = 2.0 * attention[0] * self.patch_dim * self.hidden if attention else 0.0
        blocks = sum(8.0 * (n + 1) * self.hidden ** 2 + 4.0 * (n + 1) ** 2 * self.hidden for n in attention)
        return embed + blocks + sum(4.0 * (m + 1) * self.hidden * self.intermediate for m in mlp)

    def projector_flops(self, projected: float) -> float:
        return 2.0 * projected * (self.projector_in * self.projector_hidden + self.projector_hidden ** 2)

    def flops(self, patches: float, projected: float) -> float:
        """Encoder over one image of ``patches`` patches, and the projector over ``projected`` tokens."""
        return self.encoder_flops(int(patches)) + self.projector_flops(projected)


def decoder_prefill_flops(shape: DecoderShape, layer_tokens: list[float]) -> float:
    """Decoder FLOPs when layer l processes ``layer_tokens[l]`` tokens (all of them, causally)."""
    if len(layer_tokens) != shape.layers:
        raise ValueError(f"{len(layer_tokens)} token counts for a {shape.layers}-layer decoder")
    return float(sum(shape.layer_flops(tokens) for tokens in layer_tokens))


def fastv_paper_flops(shape: DecoderShape, layer_tokens: list[float]) -> float:
    """FastV's own estimate (its Sec. 4.2): sum over layers of 4nd^2 + 2n^2d + 2ndm (d hidden, m MLP width).

    It counts multiply-adds once, a 2-matrix MLP and full-width k/v: compare its *ratios*, not its totals.
    """
    d, m = shape.hidden, shape.intermediate
    return float(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in layer_tokens))


# --- the method's own cost ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringInput:
    """What a scoring-cost rule sees for one decoder-layer application of a stage."""

    stage: Stage
    layer: int
    decoder: DecoderShape
    tokens: int  # tokens entering this layer (before this stage drops any)
    previous_tokens: int | None  # tokens that entered the layer before (None at layer 0)
    text_tokens: int  # prompt text tokens (non-visual)


def scorer_flops(decoder: DecoderShape, rows: int, keys: int) -> float:
    """:func:`tokenpress.runtime.scorer.attention_rows`: q projection of ``rows`` rows, k projection of ``keys``
    tokens, and the rows x keys logits over every head (keys repeated for grouped-query attention)."""
    q = 2.0 * rows * decoder.hidden * decoder.heads * decoder.head_dim
    k = 2.0 * keys * decoder.hidden * decoder.kv_heads * decoder.head_dim
    logits = 2.0 * decoder.heads * rows * keys * decoder.head_dim
    return q + k + logits


@dataclass(frozen=True)
class StageShape:
    """What a pre-LLM stage's own modules cost on one image row depends on (see ``Method.stage_flops``).

    A method offered at several points learns where it runs (``point``) and how wide its incoming tokens
    are (``width_in``: ``encoder_width`` while they are in encoder space, ``llm_width`` once projected)."""

    tokens_in: int
    tokens_out: int
    encoder_width: int  # a token in encoder space (what the model's projector takes)
    llm_width: int
    projector_hidden: int | None  # hidden width of the model's projector MLP (None: not a two-layer MLP)
    encoder_heads: int = 1  # attention heads of the vision encoder (a key averaged over heads is C / heads wide)
    point: str = "post_encoder"  # the insertion point the stage runs at
    space: str = "encoder"  # the space of the tokens it receives: "encoder" or "llm"

    @property
    def width_in(self) -> int:
        """Width of the tokens the stage receives."""
        return self.encoder_width if self.space == "encoder" else self.llm_width


def _method(stage: Stage) -> Any:
    return stage.method_class(stage.config, stage.layers)


def _scoring(item: ScoringInput) -> float:
    return float(_method(item.stage).scoring_flops(item))


Widths = tuple[int, int, "int | None", int]


def adapter_widths(adapter: Any) -> Widths:
    """(encoder width, LLM width, projector hidden width, encoder heads) of an attached model, for
    :class:`StageShape`."""
    projector = adapter.projector_mlp()
    return (adapter.encoder_width(), int(adapter.text_config.hidden_size),
            int(projector.first.out_features) if projector is not None else None, adapter.encoder_heads())


def stage_flops(method: Any, rows_in: list[int], rows_out: list[int], widths: Widths, point: str = "post_encoder",
                space: str = "encoder") -> list[float]:
    """``method.stage_flops`` of each image row (``rows_in``/``rows_out``: its token counts) of a stage at
    ``point`` receiving tokens in ``space``."""
    return [float(method.stage_flops(StageShape(int(n), int(m), *widths, point=point, space=space)))
            for n, m in zip(rows_in, rows_out, strict=True)]


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class Costs:
    """Prefill FLOPs by part."""

    encoder: float = 0.0
    projector: float = 0.0
    decoder: float = 0.0
    lm_head: float = 0.0
    scoring: float = 0.0
    stages: float = 0.0  # the pre-LLM stages' own modules, and the encoder signals they ask for

    @property
    def total(self) -> float:
        return self.encoder + self.projector + self.decoder + self.lm_head + self.scoring + self.stages

    def __add__(self, other: Costs) -> Costs:
        return Costs(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))


@dataclass
class StageCost:
    """One application of a stage (a decoder stage applies once per layer it lists)."""

    label: str
    method: str
    point: str
    layer: int | None  # the decoder layer (a stage inside the encoder: its encoder block)
    tokens_in: int  # visual tokens per sample
    tokens_out: int
    flops_saved: float  # net: the prefill FLOPs this application removes (negative: it adds)
    scoring_flops: float  # its own cost (scoring, or its modules before the LLM), already netted in flops_saved


@dataclass
class Breakdown:
    """The prefill FLOPs of the unmodified model and of the compressed one, per part, stage and layer."""

    model_type: str
    stack: str
    text_tokens: int
    visual_tokens: int  # visual tokens the unmodified model feeds its decoder
    baseline: Costs
    compressed: Costs
    stages: list[StageCost]
    layer_tokens: list[int]  # tokens (text + visual) each decoder layer processes, compressed
    baseline_layer_tokens: list[int]
    decoder_shape: DecoderShape
    notes: list[str] = field(default_factory=list)

    @property
    def baseline_flops(self) -> float:
        return self.baseline.total

    @property
    def compressed_flops(self) -> float:
        return self.compressed.total

    @property
    def ratio(self) -> float:
        """Compressed / baseline (0.55 means 45% fewer FLOPs)."""
        return self.compressed_flops / self.baseline_flops

    @property
    def decoder_only(self) -> dict[str, float]:
        """Decoder layers alone (no encoder, projector, lm_head or scoring), ours and FastV's formula."""
        paper_base = fastv_paper_flops(self.decoder_shape, self.baseline_layer_tokens)
        paper_ours = fastv_paper_flops(self.decoder_shape, self.layer_tokens)
        return {"baseline_flops": self.baseline.decoder, "compressed_flops": self.compressed.decoder,
                "ratio": self.compressed.decoder / self.baseline.decoder,
                "paper_formula_ratio": paper_ours / paper_base}

    def as_dict(self) -> dict[str, Any]:
        parts = {name: {"baseline": getattr(self.baseline, name), "compressed": getattr(self.compressed, name)}
                 for name in asdict(self.baseline)}
        return {
            "model_type": self.model_type, "stack": self.stack, "text_tokens": self.text_tokens,
            "visual_tokens": self.visual_tokens, "baseline_flops": self.baseline_flops,
            "compressed_flops": self.compressed_flops, "ratio": self.ratio, "decoder_only": self.decoder_only,
            "parts": parts, "stages": [asdict(stage) for stage in self.stages],
            "layer_tokens": self.layer_tokens, "baseline_layer_tokens": self.baseline_layer_tokens,
            "notes": self.notes,
        }


# --- families --------------------------------------------------------------------------------------------


@dataclass
class SimulatedRow:
    """A TokenState row in the simulation: its current grid, token count, and whether it is the full grid."""

    grid: tuple[int, int, int]
    count: int
    dense: bool = True
    high_res: bool = False  # LLaVA-NeXT's high-resolution grid (its rows end with a newline token)
    summary: bool = False  # tokens that stand for the whole image (no grid cell, no newlines)


@dataclass(frozen=True)
class ImageCosts:
    """One image as the unmodified model sees it (what :meth:`FamilyCosts.image` gives the simulation)."""

    rows: list[SimulatedRow]  # its TokenState rows, uncompressed
    encoder: float  # encoder FLOPs (every tile)
    projected: int  # tokens the unmodified model runs its projector over
    notes: tuple[str, ...] = ()  # said in the breakdown (an image size the family ignores, say)


class FamilyCosts:
    """The cost model of one model family, named by its adapter (``ModelAdapter.cost_model``).

    Built from a config alone: the measured mode reads a batch's inputs (:meth:`batch_encoder`), the
    config-only simulation asks for one image of a given size (:meth:`image`). The decoder is Llama-style
    (:class:`DecoderShape`); a subclass sets :attr:`model_type` and :attr:`label` and gives the rest.
    """

    #: The ``config.model_type`` this cost model serves.
    model_type: ClassVar[str] = ""
    #: The family's name in a breakdown, e.g. ``"LLaVA-1.5"``.
    label: ClassVar[str] = ""
    #: Whether the decoder's attention norms each head's queries and keys (:attr:`DecoderShape.qk_norm`).
    qk_norm: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.decoder = DecoderShape.from_config(config.get_text_config(), qk_norm=self.qk_norm)

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """One image of ``image_size`` (height, width in pixels; None when not given), for :func:`simulate`.

        Raises :class:`FlopsError` when the family's token count depends on a size it was not given.
        """
        raise NotImplementedError

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        """Encoder FLOPs of a batch's images, and the tokens the unmodified model projects per image."""
        raise NotImplementedError

    def projector_flops(self, tokens: int) -> float:
        """The model's projector over ``tokens`` tokens."""
        raise NotImplementedError

    def widths(self) -> Widths:
        """(encoder width, LLM width, projector hidden width, encoder heads): see :class:`StageShape`."""
        raise NotImplementedError

    #: Whether the family's vision encoder has a class token (what a class-token request is served as).
    class_token: ClassVar[bool] = True

    def signal_cost(self, request: Any) -> float:
        """:meth:`signal_flops` of the request the family computes for ``request``."""
        return self.signal_flops(served_request(request, self.class_token))

    def signal_flops(self, request: Any) -> float:
        """FLOPs of computing one encoder signal (a :class:`tokenpress.core.signals.Signal`) on one encoder
        run (one image; one tile where a family encodes tiles)."""
        return 0.0

    def encoder_runs(self, projected_per_image: list[int]) -> int:
        """How many encoder runs (images, or tiles) a batch whose images project these counts made."""
        return len(projected_per_image)

    def decoder_visual(self, rows: list[SimulatedRow], stage_label: str | None = None) -> int:
        """Visual tokens the decoder sees for an image of these rows (``stage_label``: the last stage, for errors)."""
        return sum(row.count for row in rows)

    def feature_blocks(self) -> int | None:
        """Encoder blocks that feed the features (stages may act inside them); None: the family runs no
        stage inside its encoder."""
        return None

    def encoder_run_flops(self, attention: list[int], mlp: list[int]) -> float:
        """FLOPs of one encoder run with stages inside it (see :meth:`EncoderShape.encoder_run_flops`)."""
        raise FlopsError(f"{self.label} runs no stage inside its vision encoder")

    def rows_after_encoder(self, image: ImageCosts, count: int) -> list[SimulatedRow]:
        """The image's rows when stages inside the encoder left ``count`` tokens of each encoder run."""
        raise FlopsError(f"{self.label} runs no stage inside its vision encoder")


def _config_of(model_or_config: Any) -> Any:
    return model_or_config if not isinstance(model_or_config, torch.nn.Module) else model_or_config.config


def _cost_models() -> dict[str, type[FamilyCosts]]:
    """model_type -> cost model, of the registered adapters (the first one registered for a type wins)."""

    models: dict[str, type[FamilyCosts]] = {}
    for adapter in get_registry().adapters:
        if adapter.cost_model is not None:
            models.setdefault(adapter.cost_model.model_type, adapter.cost_model)
    return models


class _SimulatedFamilies(Mapping[str, str]):
    """``{model_type: label}`` of the registered cost models, read from the registry on every use."""

    def __getitem__(self, model_type: str) -> str:
        return _cost_models()[model_type].label

    def __iter__(self) -> Iterator[str]:
        return iter(_cost_models())

    def __len__(self) -> int:
        return len(_cost_models())

    def __repr__(self) -> str:
        return repr(dict(self))


#: Model types the FLOPs model understands, and their labels (from the registered adapters' cost models).
SIMULATED_FAMILIES: Mapping[str, str] = _SimulatedFamilies()


def family_costs(config: Any) -> FamilyCosts:
    """The cost model of ``config``'s family, built from it (its layer counts, widths and image layouts,
    known from the config alone)."""
    model_type = getattr(config, "model_type", None)
    cost_model = _cost_models().get(model_type)
    if cost_model is None:
        supported = ", ".join(f"{key} ({name})" for key, name in SIMULATED_FAMILIES.items())
        raise UnsupportedModelError(f"config-only FLOPs support model_type {supported}; this config has "
                                    f"model_type {model_type!r}")
    return cost_model(config)


# --- config-only simulation ------------------------------------------------------------------------------


@dataclass
class _Path:
    costs: Costs
    layer_tokens: list[int]
    applications: list[tuple[Stage, int | None, int, int, float]]  # stage, layer, in, out, scoring


def _promise(stage: Stage, counts: list[int], layer: int | None = None) -> list[int]:
    """What the stage promises for ``counts`` (at ``layer``: its decoder layer, or its encoder block)."""
    method = _method(stage)
    counts_in = torch.tensor(counts, dtype=torch.long)
    promised = method.promised_count(counts_in) if layer is None else method.promised_count_at(counts_in, layer)
    if promised is None:
        raise FlopsError(f"stage {stage.label()}: method {stage.method!r} makes no promise about how many tokens "
                         "it keeps (promised_count() is None and it has no expected_grid), so its FLOPs cannot be "
                         "derived from the config; measure a real prefill instead")
    promised = [int(out) for out in torch.as_tensor(promised).reshape(-1).tolist()]
    if stage.point != "decoder_layer":
        return promised  # a pre-LLM stage may also make tokens (a qformer with more queries than patches)
    return [min(out, count) for out, count in zip(promised, counts, strict=True)]


def _apply_pre_llm(stage: Stage, rows: list[SimulatedRow], widths: Widths,
                   space: str) -> tuple[list[SimulatedRow], float]:
    """The rows after a pre-LLM stage receiving tokens in ``space``, and the FLOPs of its own modules."""
    method = _method(stage)
    counts_in = [row.count for row in rows]
    grids = [method.expected_grid(*row.grid[1:]) for row in rows]
    if all(grid is not None for grid in grids):
        out = []
        for row, (height, width) in zip(rows, grids, strict=True):  # on a full grid (stack.order_problem)
            frames = row.grid[0]
            out.append(SimulatedRow((frames, height, width), frames * height * width, True, row.high_res))
        return out, sum(stage_flops(method, counts_in, [row.count for row in out], widths, stage.point, space))
    counts = _promise(stage, counts_in)
    summary = stage.method_class.summary_tokens
    out = [SimulatedRow(row.grid, count, not summary and row.dense and count == row.count, row.high_res,
                        summary or row.summary) for row, count in zip(rows, counts, strict=True)]
    return out, sum(stage_flops(method, counts_in, counts, widths, stage.point, space))


def _run(family: FamilyCosts, image: ImageCosts, stack: Stack, text_tokens: int, limit: int | None) -> _Path:
    """The compressed forward of ``image`` with the first ``limit`` stage applications (all when None)."""
    decoder = family.decoder
    rows = image.rows
    applications: list[tuple[Stage, int | None, int, int, float]] = []

    def allowed() -> bool:
        return limit is None or len(applications) < limit

    projected = 0  # tokens through the model's projector
    own = 0.0
    charged: set[Any] = set()
    last_label: str | None = None
    encoder = image.encoder
    inside = [stage for stage in stack.stages if stage.inside_encoder]
    if inside:
        blocks = family.feature_blocks()
        if blocks is None:
            raise FlopsError(f"stage {inside[0].label()}: {family.label} runs no stage inside its vision encoder")
        count = sum(row.count for row in rows)
        attention, mlp = [], []
        for block in range(blocks):
            attention.append(count)
            for stage in (s for s in inside if block in s.layers):
                if not allowed():
                    continue
                out = _promise(stage, [count], block)[0]
                cost = sum(stage_flops(_method(stage), [count], [out], family.widths()))
                applications.append((stage, block, count, out, cost))
                own += cost
                count = out
                last_label = stage.label()
            mlp.append(count)
        encoder = family.encoder_run_flops(attention, mlp)
        rows = family.rows_after_encoder(image, count)
    space = "encoder"
    for point in PRE_LLM_POINTS:
        if point == "projector":
            projected = sum(row.count for row in rows)
        if point == "query_conditioned":
            space = "llm"
        for stage in (s for s in stack.stages if s.point == point and not s.inside_encoder):
            if not allowed():
                continue
            before = sum(row.count for row in rows)
            rows, stage_cost = _apply_pre_llm(stage, rows, family.widths(), space)
            if stage.method_class.returns_llm_space(point):
                space = "llm"
            for request in as_requests(_method(stage).required_signals()):
                if request not in charged:  # the encoder computes each distinct request once per prefill
                    charged.add(request)
                    stage_cost += family.signal_cost(request) * family.encoder_runs([image.projected])
            if point == "projector" and stage.method_class.replaces_projector:
                projected = 0  # the stage projects itself: the model's projector never runs
            own += stage_cost
            applications.append((stage, None, before, sum(row.count for row in rows), stage_cost))
            last_label = stage.label()
    visual = family.decoder_visual(rows, last_label)

    costs = Costs(encoder=encoder, projector=family.projector_flops(projected),
                  lm_head=decoder.lm_head_flops(1), stages=own)
    layer_tokens: list[int] = []
    for layer in range(decoder.layers):
        routed: int | None = None  # a Route sends only these through this layer; the rest come back after it
        for stage in stack.stages:
            if stage.point != "decoder_layer" or layer not in stage.layers or not allowed():
                continue
            item = ScoringInput(stage, layer, decoder, text_tokens + visual,
                                layer_tokens[layer - 1] if layer > 0 else None, text_tokens)
            scoring = _scoring(item)
            kept = _promise(stage, [visual], layer)[0]
            applications.append((stage, layer, visual, kept, scoring))
            costs.scoring += scoring
            if stage.method_class.routes:
                routed = kept if routed is None else min(routed, kept)
            else:
                visual = kept
                routed = None if routed is None else min(routed, visual)
        processed = visual if routed is None else routed
        layer_tokens.append(text_tokens + processed)
        costs.decoder += decoder.layer_flops(text_tokens + processed)
    return _Path(costs, layer_tokens, applications)


def _check_layers(stack: Stack, layers: int, blocks: int | None) -> None:
    for stage in stack.stages:
        if stage.inside_encoder:
            outside = [block for block in stage.layers if blocks is not None and block >= blocks]
            if outside:
                raise StackError(f"{stack.source}: stages[{stage.index}].layers: encoder block {outside[0]} does not "
                                 f"feed this model's features (blocks 0-{blocks - 1})")
            continue
        for layer in stage.layers:
            if layer >= layers:
                raise StackError(f"{stack.source}: stages[{stage.index}].layers: layer {layer} is out of range for "
                                 f"this model, which has {layers} decoder layers (0-{layers - 1})")


def simulate(config: Any, stack: Stack | str | Path | dict, text_tokens: int,
             image_size: tuple[int, int] | None = None) -> Breakdown:
    """Prefill FLOPs of the unmodified and the compressed model, from a config alone (no weights).

    ``text_tokens`` is the number of prompt tokens that are not image placeholders (system prompt,
    question, chat markup, Qwen's vision start/end tokens). ``image_size`` (height, width in pixels)
    is needed by LLaVA-NeXT (the original size: it picks the tiling) and Qwen2.5-VL (the size after
    its processor's resize); LLaVA-1.5 resizes every image to its encoder's size and ignores it.
    Raises :class:`FlopsError` when a stage's token count cannot be predicted.
    """

    config = _config_of(config)
    stack = load_stack(stack)
    if text_tokens < 0:
        raise FlopsError(f"text_tokens must be >= 0, got {text_tokens}")
    family = family_costs(config)
    image = family.image(image_size)
    decoder = family.decoder
    stack = stack.resolved(decoder.layers, family.feature_blocks())
    _check_layers(stack, decoder.layers, family.feature_blocks())

    visual = family.decoder_visual(image.rows)
    baseline_layers = [text_tokens + visual] * decoder.layers
    baseline = Costs(encoder=image.encoder, projector=family.projector_flops(image.projected),
                     decoder=decoder_prefill_flops(decoder, baseline_layers), lm_head=decoder.lm_head_flops(1))
    notes = list(image.notes)
    if not stack.stages:
        return Breakdown(config.model_type, stack.name, text_tokens, visual, baseline, baseline, [],
                         baseline_layers, baseline_layers, decoder, notes)

    full = _run(family, image, stack, text_tokens, None)
    previous = _run(family, image, stack, text_tokens, 0).costs.total
    if previous != baseline.total:
        notes.append(f"the compressed forward itself saves {format_flops(baseline.total - previous)} before any "
                     "stage acts (LLaVA-NeXT: it projects the base tile and the unpadded grid, not every tile); "
                     "the stages' savings do not include it")
    stages = []
    for index, (stage, layer, tokens_in, tokens_out, scoring) in enumerate(full.applications):
        total = _run(family, image, stack, text_tokens, index + 1).costs.total
        stages.append(StageCost(stage.label(), stage.method, stage.point, layer, tokens_in, tokens_out,
                                previous - total, scoring))
        previous = total
    return Breakdown(config.model_type, stack.name, text_tokens, visual, baseline, full.costs, stages,
                     full.layer_tokens, baseline_layers, decoder, notes)


# --- measured counts --------------------------------------------------------------------------------------


def _signal_flops(family: FamilyCosts, runs: int, stack: Stack | None) -> float:
    """FLOPs of the encoder signals a stack's stages ask for, over a batch's ``runs`` encoder runs."""
    if stack is None:
        return 0.0
    requested = dict.fromkeys(request for stage in stack.stages
                              for request in as_requests(_method(stage).required_signals()))
    return runs * sum(family.signal_cost(request) for request in requested)


def measured(config: Any, inputs: Mapping[str, Any], stats: PrefillStats | None = None,
             stack: Stack | str | Path | dict | None = None, records: list[StageRecord] | None = None) -> Costs:
    """Prefill FLOPs of a batch (summed over its samples) from the token counts of a real prefill.

    ``inputs`` are the model's inputs (for the images: pixel_values, image_sizes or image_grid_thw,
    and attention_mask). ``stats`` is ``handle.prefill_stats`` of a compressed prefill, or None for
    the unmodified model; ``stack`` adds its decoder stages' scoring cost (``records``, the
    handle's stage records, give the exact token count a stage at layer 0 scored).
    """

    config = _config_of(config)
    family = family_costs(config)
    decoder = family.decoder
    encoder, projected_per_image = family.batch_encoder(inputs)
    if stats is None:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        layer_tokens = [[int(n) for n in lengths]] * decoder.layers
        layer_visual: list[list[int]] | None = None
        projected = sum(projected_per_image)
    else:
        layer_tokens, layer_visual, projected = stats.layer_tokens, stats.layer_visual, sum(stats.projected)
    batch = len(layer_tokens[0])
    if stats is not None and stats.encoder_blocks is not None:
        runs = len(stats.encoder_blocks[0][0]) if stats.encoder_blocks else 0
        encoder = sum(family.encoder_run_flops([attention[run] for attention, _ in stats.encoder_blocks],
                                               [mlp[run] for _, mlp in stats.encoder_blocks]) for run in range(runs))
    if stack is not None:
        stack = load_stack(stack).resolved(decoder.layers, family.feature_blocks())
    own = sum(sum(record.own_flops) for record in records or [] if record.layer is None)
    signals = _signal_flops(family, family.encoder_runs(projected_per_image), stack) if stats is not None else 0.0
    costs = Costs(encoder=encoder, projector=family.projector_flops(projected), lm_head=decoder.lm_head_flops(batch),
                  stages=own + signals)
    for per_layer in zip(*layer_tokens, strict=True):
        costs.decoder += decoder_prefill_flops(decoder, list(per_layer))
    if stack is not None and stats is not None and layer_visual is not None:
        for sample in range(batch):
            text = layer_tokens[0][sample] - layer_visual[0][sample]
            for stage in stack.stages:
                if stage.point != "decoder_layer":
                    continue
                for layer in stage.layers:
                    previous = layer_tokens[layer - 1][sample] if layer > 0 else None
                    # tokens entering the layer before this stage drops any: what the stage record saw,
                    # else the previous layer's output (at layer 0: the tokens the layer processed)
                    record = next((r for r in records or [] if r.stage == stage.label() and r.layer == layer), None)
                    if record is not None:
                        entering = text + record.tokens_in[sample]
                    else:
                        entering = previous if previous is not None else layer_tokens[0][sample]
                    costs.scoring += _scoring(ScoringInput(stage, layer, decoder, entering, previous, text))
    return costs


def measured_from_handle(handle: Handle, inputs: Mapping[str, Any]) -> Costs:
    """:func:`measured` for the last prefill of an attached stack (unmodified model when it had no stage)."""
    return measured(handle.model.config, inputs, handle.prefill_stats, handle.stack, handle.records)


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"672x448"`` (height x width in pixels) -> (672, 448); None stays None."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise FlopsError(f"image size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 672x672")
    return int(parts[0]), int(parts[1])


def format_flops(value: float) -> str:
    """``1.23 TFLOPs``-style rendering."""
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f} FLOPs"


def format_breakdown(breakdown: Breakdown) -> str:
    """A human-readable table of a :class:`Breakdown`."""
    b = breakdown
    lines = [f"stack {b.stack!r} on {SIMULATED_FAMILIES.get(b.model_type, b.model_type)}: {b.text_tokens} text "
             f"tokens + {b.visual_tokens} visual tokens per prompt", "",
             f"{'part':<12} {'baseline':>16} {'compressed':>16} {'ratio':>7}"]
    for name in asdict(b.baseline):
        base, ours = getattr(b.baseline, name), getattr(b.compressed, name)
        ratio = f"{ours / base:.3f}" if base else "-"
        lines.append(f"{name:<12} {format_flops(base):>16} {format_flops(ours):>16} {ratio:>7}")
    lines.append(f"{'total':<12} {format_flops(b.baseline_flops):>16} {format_flops(b.compressed_flops):>16} "
                 f"{b.ratio:>7.3f}")
    decoder = b.decoder_only
    lines += ["", f"FLOPs ratio {b.ratio:.3f} ({1 - b.ratio:.1%} fewer); decoder layers only {decoder['ratio']:.3f} "
              f"({1 - decoder['ratio']:.1%} fewer; FastV's formula: {1 - decoder['paper_formula_ratio']:.1%} fewer)"]
    if b.stages:
        lines += ["", f"{'stage':<34} {'tokens in':>9} {'tokens out':>10} {'FLOPs saved':>16} {'its own cost':>14}"]
        for stage in b.stages:
            unit = "block" if stage.point == "post_encoder" else "layer"
            where = stage.label + (f" {unit} {stage.layer}" if stage.layer is not None else "")
            lines.append(f"{where:<34} {stage.tokens_in:>9} {stage.tokens_out:>10} "
                         f"{format_flops(stage.flops_saved):>16} {format_flops(stage.scoring_flops):>14}")
    lines += [f"note: {note}" for note in b.notes]
    return "\n".join(lines)


__all__ = [
    "SIMULATED_FAMILIES", "Breakdown", "Costs", "DecoderShape", "EncoderShape", "FamilyCosts", "FlopsError",
    "ImageCosts", "ScoringInput", "SimulatedRow", "StageCost", "StageShape", "adapter_widths", "decoder_prefill_flops",
    "vit_block_flops",
    "family_costs", "fastv_paper_flops", "format_breakdown", "format_flops", "measured",
    "measured_from_handle", "parse_image_size", "scorer_flops", "simulate", "stage_flops",
]

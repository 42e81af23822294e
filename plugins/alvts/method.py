"""The ``alvts`` stage: before each routed decoder layer, a low-rank selector scores the visual
tokens and only the top ``keep_ratio`` of them go through that layer (a :class:`~tokenpress.Route`);
the others skip it unchanged and rejoin the sequence, in place, for the next layer."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tokenpress import (
    DecoderContext,
    Method,
    Route,
    SelectingConfig,
    Sequence,
    WeightedConfig,
    hookimpl,
    layer_query_key,
)
from tokenpress.core import weights as weights_io
from tokenpress.core.errors import InputError
from tokenpress.core.select import topk_mask
from tokenpress_plugins.alvts.parts import LayerSelector, SelectorParts, tensor_layers
from tokenpress_plugins.alvts.selector import (
    FoldedQueryKey,
    LowRank,
    block_causal_pairs,
    importance,
    low_rank,
    rotation_is_linear,
)

#: The paper's ranks (256 for LLaVA-1.5-7B's 4096-wide decoder, 128 for Qwen2.5-VL-3B's 2048) are
#: the hidden size over 16; the default keeps that proportion.
RANK_DIVISOR = 16


class ALVTSConfig(SelectingConfig, WeightedConfig):
    """Parameters of ``alvts``. ``keep_ratio`` is the share of the visual tokens each routed layer processes."""

    rank: int | None = Field(None, ge=1, description="Rank R of the low-rank q/k stand-ins (default: the weights "
                                                     "file's, else hidden size / 16, the paper's proportion).")
    first_layer: int = Field(0, ge=0, description="When the stage lists no layers: route every layer from this one on.")
    weights: str | None = Field(None, description="A calibrated selector (`tokenpress calibrate`), `zoo` or zoo:NAME "
                                                  "for a shipped proxy's; default: the SVD of each layer's own q/k "
                                                  "weights (training-free).")
    budget: Literal["uniform", "adaptive"] = Field(
        "uniform", description="uniform: every routed layer keeps keep_ratio (the paper); adaptive: each layer its own "
                               "ratio from the selector file's calibration statistics, the same on average.")
    score: Literal["product", "visual", "text"] = Field(
        "product", description="S = S_V2V * S_T2V (the paper), or one factor alone (for ablations).")
    chunk: int = Field(64, ge=1, le=4096, description="Query rows per step of the softmax (memory: chunk x tokens).")

    @model_validator(mode="before")
    @classmethod
    def _selector_is_now_weights(cls, values: Any) -> Any:
        if isinstance(values, dict) and "selector" in values:
            raise ValueError("`selector` is now `weights` (the same file: a calibrated selector is the method's "
                             "weights)")
        return values


class ALVTS(Method):
    """Route the most important visual tokens through each decoder layer (ALVTS, CVPR 2026)."""

    name = "alvts"
    Config = ALVTSConfig
    points = ("decoder_layer",)
    routes = True
    description = "Per layer, route the top keep_ratio visual tokens by a low-rank importance score (ALVTS)."
    approach = "attention"
    paper = "ALVTS, CVPR 2026"
    year = 2026
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.5}
    config: ALVTSConfig

    partial_weights = True  # a selector calibrated for every layer serves a stage that routes some
    weights: SelectorParts | None

    def __init__(self, config: ALVTSConfig, layers: tuple[int, ...] = ()) -> None:
        super().__init__(config, layers)
        self.adapter: Any = None
        self._ratios: dict[int, float] | None = None
        #: Set to a list to record ``(layer, sequence)`` instead of routing (calibration).
        self.recording: list[tuple[int, Sequence]] | None = None
        self._cast: dict[tuple[int, str, torch.dtype], tuple[LowRank, LowRank]] = {}
        self._folded: dict[tuple[int, str], FoldedQueryKey | None] = {}

    @classmethod
    def default_layers(cls, config: ALVTSConfig, num_layers: int) -> tuple[int, ...]:
        return tuple(range(config.first_layer, num_layers))

    # --- setup ----------------------------------------------------------------------------------

    def setup(self, adapter: Any) -> None:
        self.adapter = adapter
        if self.config.budget == "adaptive" and self.config.weights is None:
            raise InputError("params.budget: adaptive budgets come from calibration statistics; give a "
                             "calibrated selector (`tokenpress calibrate`) in params.weights")

    def build_weights(self, adapter: Any) -> SelectorParts:
        """The selector of every routed layer: the SVD of its q/k weights, or (``params.weights``) parts
        of the file's shapes, which the core then loads (a file covers any layers it was calibrated for)."""
        if self.config.weights is None:
            rank = self.config.rank or max(1, adapter.text_config.hidden_size // RANK_DIVISOR)
            layers = {}
            for layer in self.layers:
                parts = adapter.attention_parts(layer)
                layers[layer] = LayerSelector(low_rank(parts.q_proj.weight, None, rank),
                                              low_rank(parts.k_proj.weight, None, rank))
            return SelectorParts(layers)
        path = weights_io.resolve(self.config.weights, self.name, self.weights_shaping(), adapter.model)
        header = weights_io.read_header(path)
        shapes = weights_io.tensor_shapes(path)
        held = tensor_layers(list(shapes))
        if header.get("method") == self.name and header.get("model", {}).get("sizes_hash") == \
                weights_io.model_signature(adapter)["sizes_hash"]:  # else the core's load says why it does not fit
            missing = [layer for layer in self.layers if layer not in held]
            if missing:
                raise InputError(f"params.weights: {path} has no selector for layers {missing} (it covers "
                                 f"{sorted(held)}); calibrate with this stack's layers")
            rank = shapes[f"layers.{self.layers[0]}.q_down"][0]
            if self.config.rank is not None and self.config.rank != rank:
                raise InputError(f"params.rank: {self.config.rank}, but {path} holds rank-{rank} factors")
            uncovered = [layer for layer in self.layers if "coverage" not in held[layer]]
            if self.config.budget == "adaptive" and uncovered:
                raise InputError(f"params.budget: {path} has no calibration statistics for layers {uncovered}")
        empty = {}
        for layer in self.layers:
            def zeros(part: str, layer: int = layer) -> torch.Tensor:
                return torch.zeros(shapes.get(f"layers.{layer}.{part}", [1, 1]))

            coverage = zeros("coverage") if "coverage" in held.get(layer, set()) else None
            empty[layer] = LayerSelector(LowRank(zeros("q_down"), zeros("q_up")),
                                         LowRank(zeros("k_down"), zeros("k_up")), coverage)
        return SelectorParts(empty)

    def weights_fingerprint(self, adapter: Any) -> dict[str, Any]:
        """Two numbers per decoder layer (sums of |W_q|, |W_k|): a selector reads those weights."""
        return {f"layer{layer}": [float(part.weight.detach().double().abs().sum())
                                  for part in (adapter.attention_parts(layer).q_proj,
                                               adapter.attention_parts(layer).k_proj)]
                for layer in range(adapter.num_layers)}

    @property
    def factors(self) -> dict[int, tuple[LowRank, LowRank]]:
        """Each routed layer's low-rank (q, k), with the layer's own biases."""
        assert self.weights is not None, "the stage is not attached"
        return {layer: self.weights[layer].projections(_bias(self.adapter.attention_parts(layer).q_proj),
                                                       _bias(self.adapter.attention_parts(layer).k_proj))
                for layer in self.layers}

    @property
    def ratios(self) -> dict[int, float]:
        """Each routed layer's keep ratio (``budget: adaptive``: from the selector's coverage curves)."""
        if self._ratios is None:
            ratio = self.config.keep_ratio
            if self.config.budget == "uniform" or ratio >= 1.0:
                self._ratios = dict.fromkeys(self.layers, ratio)
            else:
                assert self.weights is not None
                curves = {layer: self.weights.coverage(layer) for layer in self.layers}
                self._ratios = adaptive_budgets({layer: curve.float().cpu() for layer, curve in curves.items()
                                                 if curve is not None}, ratio)
        return self._ratios

    def teardown(self) -> None:
        super().teardown()
        self._cast.clear()
        self._folded.clear()
        self._ratios = None

    # --- scoring --------------------------------------------------------------------------------

    def projections(self, layer: int, reference: torch.Tensor) -> tuple[LowRank, LowRank]:
        """The layer's low-rank q and k, on ``reference``'s device and dtype (cast once per device/dtype)."""
        key = (layer, str(reference.device), reference.dtype)
        if key not in self._cast:
            q, k = self.factors[layer]
            self._cast[key] = (q.to(reference), k.to(reference))
        return self._cast[key]

    def folded(self, layer: int, reference: torch.Tensor) -> FoldedQueryKey | None:
        """The selector's (q, k) at ``layer`` with the rotation folded in (on ``reference``'s device), or
        None where it cannot be: per-head norms between projection and rotation (Qwen3, Gemma 3), or an
        adapter whose :meth:`rotate` is not ``x * cos + T(x) * sin``."""
        key = (layer, str(reference.device))
        if key not in self._folded:
            parts = self.adapter.attention_parts(layer)
            width = parts.head_dim
            ones, zeros = torch.ones(1, 1, width), torch.zeros(1, 1, width)

            def turn(x: torch.Tensor) -> torch.Tensor:
                return self.adapter.rotate(x, zeros.to(x), ones.to(x), heads_dim=2)

            def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
                return self.adapter.rotate(x, cos, sin, heads_dim=2)

            plain = parts.q_norm is None and parts.k_norm is None
            if plain and rotation_is_linear(rotate, turn, parts.num_heads, width):
                q, k = self.factors[layer]
                folded = FoldedQueryKey.fold(q, k, turn, parts.num_heads, parts.num_kv_heads, width, parts.scaling)
                self._folded[key] = folded.to(reference.device)
            else:
                self._folded[key] = None
        return self._folded[key]

    def scores(self, sequence: Sequence, layer: int, projections: tuple[Any, Any] | None = None) -> torch.Tensor:
        """Importance S of every slot of ``sequence`` (the hidden states entering ``layer``), (B, N).

        ``projections`` replaces the selector's (q, k): the layer's own ``q_proj``/``k_proj`` give the
        exact score S*; trainable :class:`LowRank` factors are what calibration optimises. Without it, the
        selector's own factors run folded (:meth:`folded`) where the layer allows it.
        """
        parts = self.adapter.attention_parts(layer)
        text = sequence.is_prompt & ~sequence.is_visual
        combine = {"product": None, "visual": lambda v, t: v, "text": lambda v, t: t}[self.config.score]
        folded = self.folded(layer, sequence.hidden) if projections is None else None
        if folded is not None:
            normed = parts.input_norm(sequence.hidden)
            cos, sin = self.adapter.rotary_tables(normed, sequence.positions, layer)
            return folded.importance(normed, cos, sin, sequence.valid, sequence.is_visual, text, self.config.chunk,
                                     combine)
        chosen = projections if projections is not None else self.projections(layer, sequence.hidden)
        query, key = layer_query_key(self.adapter, layer, sequence, projections=chosen)
        return importance(query, key, sequence.valid, sequence.is_visual, text, parts.scaling, self.config.chunk,
                          combine)

    def exact_scores(self, sequence: Sequence, layer: int) -> torch.Tensor:
        """S*: the same score from the layer's exact q/k projections."""
        parts = self.adapter.attention_parts(layer)
        return self.scores(sequence, layer, (parts.q_proj, parts.k_proj))

    def counts(self, visual: torch.Tensor, layer: int) -> torch.Tensor:
        """Visual tokens routed through ``layer``: floor(ratio x visual), at least one."""
        return torch.clamp(torch.floor(visual.double() * self.ratios.get(layer, self.config.keep_ratio) + 1e-9).long(),
                           min=1)

    # --- the hook -------------------------------------------------------------------------------

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Route | None:
        layer = context.layer_index
        if self.recording is not None:
            self.recording.append((layer, context.sequence))
            return None
        if self.ratios.get(layer, self.config.keep_ratio) >= 1.0:
            return None  # every token goes through: nothing to score
        scores = self.scores(context.sequence, layer)
        counts = self.counts(context.visual_counts(), layer).to(scores.device)
        return Route(topk_mask(scores, context.is_visual, counts))

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return self.counts(torch.as_tensor(tokens_in), self.layers[0] if self.layers else -1) \
            if self.config.budget == "uniform" else None

    # --- calibration ----------------------------------------------------------------------------

    @classmethod
    def calibrate(cls, model: Any, stage: dict[str, Any], train: list[dict[str, torch.Tensor]],
                  held_out: list[dict[str, torch.Tensor]], *, epochs: int, lr: float, seed: int,
                  progress: bool = True) -> Any:
        """Importance-consistency calibration of this stage's selector (see ``calibrate.py``)."""
        from tokenpress_plugins.alvts.calibrate import calibrate

        return calibrate(model, stage, train, held_out, epochs=epochs, lr=lr, seed=seed, progress=progress)

    # --- cost -----------------------------------------------------------------------------------

    def scoring_flops(self, item: Any) -> float:
        """The selector's FLOPs at one layer: the low-rank q and k of every token, the logits of every row
        against the keys up to its block's end (block-causal), and the two weighted sums over rows and heads
        (S_V2V, S_T2V). Folded (:meth:`folded`), each up-projection also yields its turned half, for every
        query head."""
        decoder = item.decoder
        rank = self.config.rank
        if rank is None and self.weights is not None:
            rank = self.weights.rank
        elif rank is None and self.config.weights not in (None, "zoo"):  # a file: its rank, without attaching
            path = weights_io.resolve(self.config.weights, self.name, self.weights_shaping())
            rank = next(shape[0] for name, shape in weights_io.tensor_shapes(path).items() if name.endswith("q_down"))
        rank = rank or max(1, decoder.hidden // RANK_DIVISOR)
        tokens = item.tokens
        q_width, k_width = decoder.heads * decoder.head_dim, decoder.kv_heads * decoder.head_dim
        q_rank, k_rank = min(rank, decoder.hidden, q_width), min(rank, decoder.hidden, k_width)  # as low_rank clamps
        if not decoder.qk_norm:  # folded: [up | T up], keys repeated per query head
            q_width = k_width = 2 * decoder.heads * decoder.head_dim
        projections = 2.0 * tokens * (q_rank * (decoder.hidden + q_width) + k_rank * (decoder.hidden + k_width))
        pairs = block_causal_pairs(tokens, self.config.chunk)
        logits = 2.0 * decoder.heads * pairs * decoder.head_dim
        sums = 2.0 * 2 * decoder.heads * pairs  # both weighted row sums, over every head at once
        return projections + logits + sums


def _bias(linear: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    return None if bias is None else bias.detach().to(torch.float32)


def adaptive_budgets(curves: dict[int, torch.Tensor], ratio: float) -> dict[int, float]:
    """Per-layer keep ratios that cover the same share of each layer's exact importance, averaging ``ratio``.

    ``curves[layer][j]`` is the share of the importance held by the best ``j / (points - 1)`` of the
    visual tokens (calibration means). A layer whose importance is concentrated needs few tokens to
    reach the common share, a diffuse one many; the common share is found by bisection so that the
    ratios average ``ratio`` (the uniform budget's token work, hence its decoder FLOPs up to the small
    attention term).
    """
    points = next(iter(curves.values())).numel()
    fractions = torch.linspace(0, 1, points)

    def needed(curve: torch.Tensor, share: float) -> float:
        reach = torch.nonzero(curve >= share - 1e-12).flatten()
        return float(fractions[reach[0]]) if reach.numel() else 1.0

    low, high = 0.0, 1.0
    for _ in range(60):
        share = (low + high) / 2
        mean = sum(needed(curve, share) for curve in curves.values()) / len(curves)
        low, high = (share, high) if mean < ratio else (low, share)
    ratios = {layer: max(needed(curve, high), 1.0 / (points - 1)) for layer, curve in curves.items()}
    scale = ratio * len(ratios) / sum(ratios.values())
    return {layer: min(1.0, value * scale) for layer, value in ratios.items()}


__all__ = ["ALVTS", "ALVTSConfig", "adaptive_budgets"]

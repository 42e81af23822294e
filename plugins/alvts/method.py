"""The ``alvts`` stage: before each routed decoder layer, a low-rank selector scores the visual
tokens and only the top ``keep_ratio`` of them go through that layer (a :class:`~tokenpress.Route`);
the others skip it unchanged and rejoin the sequence, in place, for the next layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from tokenpress import DecoderContext, Method, Route, SelectingConfig, hookimpl
from tokenpress.errors import InputError
from tokenpress.scorer import layer_query_key
from tokenpress.select import topk_mask
from tokenpress.sequence import Sequence
from tokenpress_plugins.alvts import selector_file
from tokenpress_plugins.alvts.selector import LowRank, importance, low_rank

#: The paper's ranks (256 for LLaVA-1.5-7B's 4096-wide decoder, 128 for Qwen2.5-VL-3B's 2048) are
#: the hidden size over 16; the default keeps that proportion.
RANK_DIVISOR = 16


class ALVTSConfig(SelectingConfig):
    """Parameters of ``alvts``. ``keep_ratio`` is the share of the visual tokens each routed layer processes."""

    rank: int | None = Field(None, ge=1, description="Rank R of the low-rank q/k stand-ins (default: the selector "
                                                     "file's, else hidden size / 16, the paper's proportion).")
    first_layer: int = Field(0, ge=0, description="When the stage lists no layers: route every layer from this one on.")
    selector: str | None = Field(None, description="A calibrated selector file (`tokenpress calibrate`), or "
                                                   "zoo:NAME for a shipped proxy's; default: the SVD of each layer's "
                                                   "own q/k weights (training-free).")
    budget: Literal["uniform", "adaptive"] = Field(
        "uniform", description="uniform: every routed layer keeps keep_ratio (the paper); adaptive: each layer its own "
                               "ratio from the selector file's calibration statistics, the same on average.")
    score: Literal["product", "visual", "text"] = Field(
        "product", description="S = S_V2V * S_T2V (the paper), or one factor alone (for ablations).")
    chunk: int = Field(64, ge=1, le=4096, description="Query rows per step of the softmax (memory: chunk x tokens).")


def resolve_selector_path(value: str) -> Path:
    """``zoo:NAME`` -> the selector shipped beside that proxy model; anything else is a file path."""
    if value.startswith("zoo:"):
        from tokenpress.zoo import zoo_path

        try:
            return zoo_path(value) / "alvts-selector.safetensors"
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return Path(value)


class ALVTS(Method):
    """Route the most important visual tokens through each decoder layer (ALVTS, CVPR 2026)."""

    name = "alvts"
    Config = ALVTSConfig
    points = ("decoder_layer",)
    routes = True
    description = "Per layer, route the top keep_ratio visual tokens by a low-rank importance score (ALVTS)."
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.5}
    config: ALVTSConfig

    def __init__(self, config: ALVTSConfig, layers: tuple[int, ...] = ()) -> None:
        super().__init__(config, layers)
        self.adapter: Any = None
        self.factors: dict[int, tuple[LowRank, LowRank]] = {}
        self.ratios: dict[int, float] = {}
        self.selector: selector_file.SelectorFile | None = None
        #: Set to a list to record ``(layer, sequence)`` instead of routing (calibration).
        self.recording: list[tuple[int, Sequence]] | None = None
        self._cast: dict[tuple[int, str, torch.dtype], tuple[LowRank, LowRank]] = {}

    @classmethod
    def default_layers(cls, config: ALVTSConfig, num_layers: int) -> tuple[int, ...]:
        return tuple(range(config.first_layer, num_layers))

    # --- setup ----------------------------------------------------------------------------------

    def setup(self, adapter: Any) -> None:
        self.adapter = adapter
        if self.config.selector is not None:
            self._load(adapter)
        else:
            if self.config.budget == "adaptive":
                raise InputError("params.budget: adaptive budgets come from calibration statistics; give a "
                                 "selector file (`tokenpress calibrate`) in params.selector")
            rank = self.config.rank or max(1, adapter.text_config.hidden_size // RANK_DIVISOR)
            for layer in self.layers:
                parts = adapter.attention_parts(layer)
                self.factors[layer] = (low_rank(parts.q_proj.weight, parts.q_proj.bias, rank),
                                       low_rank(parts.k_proj.weight, parts.k_proj.bias, rank))
        self.ratios = self._budgets()

    def _load(self, adapter: Any) -> None:
        path = resolve_selector_path(self.config.selector or "")
        signature = selector_file.decoder_signature(adapter.text_config, adapter.family)
        fingerprints = {layer: selector_file.weight_fingerprint(adapter.attention_parts(layer).q_proj.weight,
                                                                adapter.attention_parts(layer).k_proj.weight)
                        for layer in self.layers}
        loaded = selector_file.load(path, signature, fingerprints)
        missing = [layer for layer in self.layers if layer not in loaded.factors]
        if missing:
            raise InputError(f"params.selector: {path} has no factors for layers {missing} (it covers "
                             f"{loaded.layers}); calibrate with this stack's layers")
        if self.config.rank is not None and self.config.rank != loaded.rank:
            raise InputError(f"params.rank: {self.config.rank}, but {path} holds rank-{loaded.rank} factors")
        for layer in self.layers:
            parts = adapter.attention_parts(layer)
            stored = loaded.factors[layer]
            self.factors[layer] = (
                LowRank(stored["q_down"], stored["q_up"], _bias(parts.q_proj)),
                LowRank(stored["k_down"], stored["k_up"], _bias(parts.k_proj)))
        self.selector = loaded

    def _budgets(self) -> dict[int, float]:
        ratio = self.config.keep_ratio
        if self.config.budget == "uniform" or ratio >= 1.0:
            return dict.fromkeys(self.layers, ratio)
        assert self.selector is not None
        curves = {layer: self.selector.coverage.get(layer) for layer in self.layers}
        missing = [layer for layer, curve in curves.items() if curve is None]
        if missing:
            raise InputError(f"params.budget: the selector file has no calibration statistics for layers {missing}")
        return adaptive_budgets({layer: curve for layer, curve in curves.items() if curve is not None}, ratio)

    # --- scoring --------------------------------------------------------------------------------

    def projections(self, layer: int, reference: torch.Tensor) -> tuple[LowRank, LowRank]:
        """The layer's low-rank q and k, on ``reference``'s device and dtype (cast once per device/dtype)."""
        key = (layer, str(reference.device), reference.dtype)
        if key not in self._cast:
            q, k = self.factors[layer]
            self._cast[key] = (q.to(reference), k.to(reference))
        return self._cast[key]

    def scores(self, sequence: Sequence, layer: int, projections: tuple[Any, Any] | None = None) -> torch.Tensor:
        """Importance S of every slot of ``sequence`` (the hidden states entering ``layer``), (B, N).

        ``projections`` replaces the selector's (q, k): the layer's own ``q_proj``/``k_proj`` give the
        exact score S*; trainable :class:`LowRank` factors are what calibration optimises.
        """
        parts = self.adapter.attention_parts(layer)
        chosen = projections if projections is not None else self.projections(layer, sequence.hidden)
        query, key = layer_query_key(self.adapter, layer, sequence, projections=chosen)
        text = sequence.is_prompt & ~sequence.is_visual
        combine = {"product": None, "visual": lambda v, t: v, "text": lambda v, t: t}[self.config.score]
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
        """The selector's FLOPs at one layer: the low-rank q and k of every token, the logits of every
        visual and text row against every key, and the two row sums (S_V2V, S_T2V)."""
        decoder = item.decoder
        rank = self.config.rank
        if rank is None and self.config.selector is not None:
            rank = int(selector_file.read_header(resolve_selector_path(self.config.selector))["rank"])
        rank = rank or max(1, decoder.hidden // RANK_DIVISOR)
        tokens = item.tokens
        q_width, k_width = decoder.heads * decoder.head_dim, decoder.kv_heads * decoder.head_dim
        q_rank, k_rank = min(rank, decoder.hidden, q_width), min(rank, decoder.hidden, k_width)  # as low_rank clamps
        projections = 2.0 * tokens * (q_rank * (decoder.hidden + q_width) + k_rank * (decoder.hidden + k_width))
        logits = 2.0 * decoder.heads * tokens * tokens * decoder.head_dim
        sums = 2.0 * 2 * tokens * tokens
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


__all__ = ["ALVTS", "ALVTSConfig", "adaptive_budgets", "resolve_selector_path"]

"""Importance-consistency calibration of ALVTS's selector.

For every routed layer the low-rank factors (initialised from the SVD of the layer's own q/k
weights) are tuned so that the selector's importance ``S`` matches ``S*``, the same score computed
with the layer's exact projections, on the hidden states the uncompressed model feeds that layer.
Each layer has its own loss (an MSE between the two scores, each normalised to mean 1 over the
image's visual tokens) and its own factors; the model's weights never change.

The hidden states come from the model itself: the stage is attached in recording mode (it routes
nothing and keeps the sequence entering each of its layers), so calibration sees exactly what the
stage sees at inference, batches and padding included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokenpress
from tokenpress.core import weights as weights_io
from tokenpress.core.errors import InputError
from tokenpress_plugins.alvts.method import ALVTS
from tokenpress_plugins.alvts.parts import LayerSelector, SelectorParts
from tokenpress_plugins.alvts.selector import LowRank, coverage_curve


@dataclass
class LayerFidelity:
    """How well S ranks like S* at one layer, on held-out prompts (before and after calibration)."""

    layer: int
    overlap_svd: float  # |top-k(S) & top-k(S*)| / k, mean over images
    overlap_calibrated: float
    spearman_svd: float  # rank correlation of S and S* over the visual tokens, mean over images
    spearman_calibrated: float
    loss_svd: float
    loss_calibrated: float


@dataclass
class CalibrationReport:
    """The calibrated selector (``parts``), how it was made (``info``) and how well it ranks."""

    parts: SelectorParts
    info: dict[str, Any]  # written into the weights file's header
    signature: dict[str, Any]  # the model it was calibrated for (tokenpress.core.weights.model_signature)
    fidelity: list[LayerFidelity]
    samples: int
    seconds: float
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss per step (sum over layers)

    def save(self, path: str | Path) -> Path:
        """Write the selector as ``alvts`` method weights (what ``params.weights`` names)."""
        return weights_io.save(path, ALVTS.name, {}, self.signature, self.parts, {"calibration": self.info})

    def table(self) -> str:
        keep = self.info.get("overlap_keep_ratio")
        lines = ["| layer | top-k overlap SVD | top-k overlap calibrated | Spearman SVD | Spearman calibrated |"
                 " MSE SVD | MSE calibrated |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in self.fidelity:
            lines.append(f"| {row.layer} | {row.overlap_svd:.3f} | {row.overlap_calibrated:.3f} | "
                         f"{row.spearman_svd:.3f} | {row.spearman_calibrated:.3f} | {row.loss_svd:.4f} | "
                         f"{row.loss_calibrated:.4f} |")
        return f"top-k at keep_ratio {keep}\n" + "\n".join(lines)


def _normalised(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over each row's visual tokens (so layers and images weigh alike)."""
    total = (scores * visual).sum(-1, keepdim=True)
    count = visual.sum(-1, keepdim=True).clamp_min(1)
    return scores * count / total.clamp_min(1e-30)


def consistency_loss(predicted: torch.Tensor, target: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The per-layer MSE between normalised S and S* over the real visual tokens."""
    difference = (_normalised(predicted, visual) - _normalised(target, visual)) ** 2
    return (difference * visual).sum() / visual.sum().clamp_min(1)


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks_a = torch.argsort(torch.argsort(a)).double()
    ranks_b = torch.argsort(torch.argsort(b)).double()
    ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    denominator = (ranks_a.norm() * ranks_b.norm()).clamp_min(1e-12)
    return float((ranks_a * ranks_b).sum() / denominator)


def _agreement(predicted: torch.Tensor, target: torch.Tensor, visual: torch.Tensor, keep_ratio: float
               ) -> tuple[list[float], list[float]]:
    overlaps, correlations = [], []
    for row_p, row_t, mask in zip(predicted, target, visual, strict=True):
        p, t = row_p[mask], row_t[mask]
        if p.numel() < 2:
            continue
        k = max(1, int(p.numel() * keep_ratio))
        top_p = set(torch.topk(p, k).indices.tolist())
        top_t = set(torch.topk(t, k).indices.tolist())
        overlaps.append(len(top_p & top_t) / k)
        correlations.append(_rank_correlation(p, t))
    return overlaps, correlations


def _recorded(model: Any, method: ALVTS, batch: dict[str, torch.Tensor]) -> list[tuple[int, Any]]:
    method.recording = []
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
        return method.recording
    finally:
        method.recording = None


def calibrate(model: Any, stage: dict[str, Any], train: list[dict[str, torch.Tensor]],
              held_out: list[dict[str, torch.Tensor]], epochs: int = 4, lr: float = 1e-3, seed: int = 0,
              progress: bool = True) -> CalibrationReport:
    """Tune the selector of the ``alvts`` stage ``stage`` (a stack stage dict) on ``model``.

    ``train`` batches are visited in order, ``epochs`` times; ``held_out`` batches measure fidelity
    before and after. Deterministic on the CPU given the batches and ``seed``.
    """
    from tqdm.auto import tqdm

    if not lr > 0:
        raise InputError(f"--lr {lr}: the learning rate must be positive")
    torch.manual_seed(seed)
    params = {**stage.get("params", {}), "weights": None, "budget": "uniform"}
    spec = {**stage, "params": params}
    keep_ratio = float(params.get("keep_ratio", ALVTS.Config.model_fields["keep_ratio"].default))
    overlap_ratio = keep_ratio if keep_ratio < 1.0 else 0.25
    samples = sum(int(batch["input_ids"].shape[0]) for batch in train)
    start = time.perf_counter()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:  # gradients flow into the selector's factors only
        parameter.requires_grad_(False)
    try:
        with tokenpress.compress(model, {"name": "alvts-calibration", "stages": [spec]}) as handle:
            method = handle.entries[0].method
            assert isinstance(method, ALVTS)
            adapter = method.adapter
            initial = dict(method.factors)
            trainable = {layer: (_copy(q, True), _copy(k, True)) for layer, (q, k) in initial.items()}
            optimizer = torch.optim.Adam([t for pair in trainable.values() for part in pair for t in part.parameters()],
                                         lr=lr)
            before = _fidelity(model, method, held_out, initial, overlap_ratio)
            losses: list[float] = []
            coverage: dict[int, list[torch.Tensor]] = {layer: [] for layer in method.layers}
            steps = epochs * len(train)
            bar = tqdm(total=steps, desc="calibrate", unit="batch", disable=not progress)
            for epoch in range(epochs):
                for batch in train:
                    optimizer.zero_grad(set_to_none=True)
                    total = 0.0
                    for layer, sequence in _recorded(model, method, batch):
                        visual = sequence.is_visual & sequence.valid
                        with torch.no_grad():
                            target = method.exact_scores(sequence, layer)
                            if epoch == 0:
                                coverage[layer].append(coverage_curve(target, visual))
                        loss = consistency_loss(method.scores(sequence, layer, trainable[layer]), target, visual)
                        loss.backward()
                        total += float(loss.detach())
                    optimizer.step()
                    losses.append(total)
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.4f}")
            bar.close()
            calibrated = {layer: (_copy(q), _copy(k)) for layer, (q, k) in trainable.items()}
            after = _fidelity(model, method, held_out, calibrated, overlap_ratio)
            signature = weights_io.model_signature(adapter, method)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    seconds = time.perf_counter() - start
    fidelity = [LayerFidelity(layer, overlap_svd=before[layer][0], overlap_calibrated=after[layer][0],
                              spearman_svd=before[layer][1], spearman_calibrated=after[layer][1],
                              loss_svd=before[layer][2], loss_calibrated=after[layer][2]) for layer in sorted(before)]
    rank = next(iter(calibrated.values()))[0].rank
    info = {"rank": rank, "layers": sorted(calibrated), "samples": samples, "epochs": epochs, "lr": lr, "seed": seed,
            "steps": steps, "seconds": round(seconds, 2), "score": params.get("score", "product"),
            "overlap_keep_ratio": overlap_ratio, "fidelity": [vars(row) for row in fidelity]}
    curves = {layer: torch.cat(parts).mean(0) for layer, parts in coverage.items() if parts}
    parts = SelectorParts({layer: LayerSelector(q, k, curves.get(layer)) for layer, (q, k) in calibrated.items()})
    return CalibrationReport(parts, info, signature, fidelity, samples, seconds, steps, losses)


def _copy(projection: LowRank, trainable: bool = False) -> LowRank:
    return LowRank(projection.down.detach().clone().requires_grad_(trainable),
                   projection.up.detach().clone().requires_grad_(trainable),
                   None if projection.bias is None else projection.bias.detach().clone())


@torch.no_grad()
def _fidelity(model: Any, method: ALVTS, batches: list[dict[str, torch.Tensor]],
              factors: dict[int, tuple[LowRank, LowRank]], keep_ratio: float) -> dict[int, tuple[float, float, float]]:
    """Per layer: mean top-k overlap, mean Spearman correlation and mean loss of S against S*."""
    overlaps: dict[int, list[float]] = {layer: [] for layer in factors}
    correlations: dict[int, list[float]] = {layer: [] for layer in factors}
    losses: dict[int, list[float]] = {layer: [] for layer in factors}
    for batch in batches:
        for layer, sequence in _recorded(model, method, batch):
            visual = sequence.is_visual & sequence.valid
            target = method.exact_scores(sequence, layer)
            predicted = method.scores(sequence, layer, factors[layer])
            overlap, correlation = _agreement(predicted, target, visual, keep_ratio)
            overlaps[layer] += overlap
            correlations[layer] += correlation
            losses[layer].append(float(consistency_loss(predicted, target, visual)))
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    return {layer: (mean(overlaps[layer]), mean(correlations[layer]), mean(losses[layer])) for layer in factors}

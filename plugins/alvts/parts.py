"""ALVTS's selector as method weights: the low-rank factors of each routed layer's q and k, and,
once calibrated, the layer's coverage curve, as one ``nn.Module`` (see :mod:`tokenpress.core.weights`).

Initialised from the SVD of each layer's own q/k weights (training-free); ``tokenpress calibrate``
tunes the factors and writes them, with the curves, as a weights file (``params.weights``). The
biases are the layer's own and are not stored.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenpress_plugins.alvts.selector import LowRank


class LayerSelector(nn.Module):
    """One routed layer: ``q ~ q_up @ q_down``, ``k ~ k_up @ k_down`` and, optionally, its coverage curve."""

    def __init__(self, q: LowRank, k: LowRank, coverage: torch.Tensor | None = None) -> None:
        super().__init__()
        for name, value in (("q_down", q.down), ("q_up", q.up), ("k_down", k.down), ("k_up", k.up)):
            self.register_parameter(name, nn.Parameter(value.detach().to(torch.float32).clone(), requires_grad=False))
        if coverage is not None:
            self.register_buffer("coverage", coverage.detach().to(torch.float32).clone())

    @property
    def rank(self) -> int:
        return self.q_down.shape[0]

    def projections(self, q_bias: torch.Tensor | None, k_bias: torch.Tensor | None) -> tuple[LowRank, LowRank]:
        return LowRank(self.q_down, self.q_up, q_bias), LowRank(self.k_down, self.k_up, k_bias)


class SelectorParts(nn.Module):
    """Every routed layer's :class:`LayerSelector`, keyed by the layer's index."""

    def __init__(self, layers: dict[int, LayerSelector]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(layer): part for layer, part in sorted(layers.items())})

    def __getitem__(self, layer: int) -> LayerSelector:
        return self.layers[str(layer)]

    @property
    def indices(self) -> list[int]:
        return sorted(int(layer) for layer in self.layers)

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    def coverage(self, layer: int) -> torch.Tensor | None:
        return getattr(self[layer], "coverage", None)


def tensor_layers(names: list[str]) -> dict[int, set[str]]:
    """Layer -> the parts a weights file holds for it, from its tensor names (``layers.3.q_down``)."""
    found: dict[int, set[str]] = {}
    for name in names:
        prefix, _, rest = name.partition(".")
        layer, _, part = rest.partition(".")
        if prefix == "layers" and layer.isdigit():  # a file of another method has none: the core refuses it
            found.setdefault(int(layer), set()).add(part)
    return found

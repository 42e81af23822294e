"""ALVTS selector files: the low-rank factors of each routed layer as safetensors, with a JSON header.

The header (safetensors metadata, ``"tokenpress"`` key) says which model the factors were
calibrated for - the decoder's shape (hashed) and a fingerprint of its q/k weights - the rank,
the layers, how they were made (samples, seed, steps) and, for ``budget: adaptive``, the per-layer
coverage curves of the exact importance. A file made for another model is refused in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenpress.errors import InputError

FORMAT = "tokenpress-alvts-selector"
VERSION = 1
#: Relative tolerance of the weight fingerprint (a checkpoint loaded in another dtype still matches).
FINGERPRINT_RTOL = 1e-2


@dataclass
class SelectorFile:
    """What a selector file holds: per layer ``(q, k)`` factors, coverage curves, and the header."""

    factors: dict[int, dict[str, torch.Tensor]]  # layer -> {"q_down", "q_up", "k_down", "k_up"}
    coverage: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (points,) mean coverage curve
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.header["rank"])

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)


def decoder_signature(text_config: Any, family: str) -> dict[str, Any]:
    """The decoder sizes a selector depends on."""
    heads = text_config.num_attention_heads
    return {
        "family": family,
        "hidden_size": text_config.hidden_size,
        "num_hidden_layers": text_config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
    }


def signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def weight_fingerprint(q_weight: torch.Tensor, k_weight: torch.Tensor) -> list[float]:
    """Two numbers per layer that tell checkpoints of one architecture apart (sums of |W_q|, |W_k|)."""
    return [float(q_weight.detach().double().abs().sum()), float(k_weight.detach().double().abs().sum())]


def save(path: str | Path, selector: SelectorFile) -> Path:
    from safetensors.torch import save_file

    tensors = {f"layer{layer}.{name}": value.detach().to(torch.float32).contiguous().cpu()
               for layer, parts in selector.factors.items() for name, value in parts.items()}
    tensors.update({f"layer{layer}.coverage": curve.to(torch.float32).contiguous().cpu()
                    for layer, curve in selector.coverage.items()})
    header = {"format": FORMAT, "version": VERSION, **selector.header}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"tokenpress": json.dumps(header, sort_keys=True)})
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a selector file (no tensors read)."""
    from tokenpress.weights import read_file_header

    header = read_file_header(path, "params.selector: ", "selector", "tokenpress calibrate")
    if header.get("format") != FORMAT:
        raise InputError(f"{path}: a tokenpress file of format {header.get('format')!r}, not an ALVTS selector")
    if header.get("version") != VERSION:
        raise InputError(f"{path}: selector format version {header.get('version')}, this tokenpress reads {VERSION}")
    return header


def load(path: str | Path, signature: dict[str, Any], fingerprints: dict[int, list[float]]) -> SelectorFile:
    """The selector at ``path``, checked against the model (its decoder signature and weights)."""
    from safetensors.torch import load_file

    header = read_header(path)
    if header.get("signature_hash") != signature_hash(signature):
        made_for = header.get("signature", {})
        raise InputError(f"{path}: this selector was calibrated for another model ({_describe(made_for)}), not this "
                         f"one ({_describe(signature)}); calibrate one for it with `tokenpress calibrate`")
    for layer, expected in fingerprints.items():
        stored = header.get("fingerprint", {}).get(str(layer))
        if stored is None:
            continue
        if not all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL) for a, b in zip(stored, expected, strict=True)):
            raise InputError(f"{path}: this selector was calibrated for other weights of the same architecture "
                             f"(layer {layer}'s q/k weights differ); calibrate one for this checkpoint")
    tensors = load_file(str(path))
    factors: dict[int, dict[str, torch.Tensor]] = {}
    coverage: dict[int, torch.Tensor] = {}
    for name, value in tensors.items():
        layer_name, part = name.split(".", 1)
        layer = int(layer_name.removeprefix("layer"))
        if part == "coverage":
            coverage[layer] = value
        else:
            factors.setdefault(layer, {})[part] = value
    return SelectorFile(factors, coverage, header)


def _describe(signature: dict[str, Any]) -> str:
    if not signature:
        return "unknown"
    return (f"{signature.get('family')}, hidden {signature.get('hidden_size')}, {signature.get('num_hidden_layers')} "
            f"layers, {signature.get('num_attention_heads')} heads")

"""A KV cache whose layers may hold different tokens, plus the bookkeeping to keep decoding right."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class DecodeState:
    """What decoding steps need from the prefill of a compressed prompt.

    ``key_valid[l]`` (B, S_l) marks the real entries of layer l's cache (the cache holds padding
    slots too); ``next_position[l]`` (B,) is the RoPE position the next text token takes at layer l
    (the same for every layer with ``positions: original``; per layer with ``compact``).
    """

    key_valid: list[torch.Tensor]
    next_position: list[torch.Tensor]
    logical_length: int
    position_offset: torch.Tensor  # (B,): next text position at layer 0 minus the real prompt tokens
    padded: list[bool] | None = None  # per layer: whether key_valid[l] has a false entry (host), None: unknown
    key_positions: list[torch.Tensor] | None = None  # per layer: (R, B, S_l) positions of its cached keys


class CompressedCache(DynamicCache):
    """The cache a compressed prefill returns: layer l holds exactly the tokens layer l processed.

    ``get_seq_length()`` reports the length of the *uncompressed* input seen so far (what
    ``generate`` counts in input ids), while each layer's tensors are shorter. Pass the returned
    cache back for the next step (``cache=``, or ``past_key_values=`` before transformers 5.24), as
    ``generate`` does.
    """

    def __init__(self, state: DecodeState | None = None) -> None:
        super().__init__()
        self.tokenpress_state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.tokenpress_state is None:
            return super().get_seq_length(layer_idx)
        return self.tokenpress_state.logical_length

    def layer_lengths(self) -> list[int]:
        """Number of cache slots (real and padding) per layer."""
        return [layer.get_seq_length() for layer in self.layers]

    def real_lengths(self) -> torch.Tensor:
        """Real (non-padding) cached tokens, (num_layers, B)."""
        assert self.tokenpress_state is not None
        return torch.stack([valid.sum(-1) for valid in self.tokenpress_state.key_valid])

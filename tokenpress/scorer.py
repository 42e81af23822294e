"""Flash-safe attention scores: a few query rows against all keys, recomputed from a layer's weights.

FastV-style methods need "how much does the last prompt token attend to each visual token at layer
i". Asking the model for ``output_attentions`` would force the eager N x N attention matrix (and
break ``sdpa``/FlashAttention). Instead we recompute only the rows we need from that layer's own
input norm, q/k projections and rotary embedding: the cost and memory are O(rows x N).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenpress.sequence import Sequence
from tokenpress.tokens import pack_index

if TYPE_CHECKING:
    from tokenpress.adapters.base import ModelAdapter


def attention_rows(
    adapter: ModelAdapter,
    layer_index: int,
    sequence: Sequence,
    query_index: torch.Tensor,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of the query slots ``query_index`` (B, R) at layer ``layer_index``.

    ``sequence`` must be the hidden states *entering* that layer. Returns (B, R, N) float32,
    averaged over heads, causal (a query sees only slots up to its own) and over real keys only.
    Rows whose ``query_valid`` is false are all zero.
    """
    parts = adapter.attention_parts(layer_index)
    batch, length, dim = sequence.hidden.shape
    rows = query_index.shape[1]
    normed = parts.input_norm(sequence.hidden)
    query_in = torch.gather(normed, 1, query_index.unsqueeze(-1).expand(-1, -1, dim))
    query = parts.q_proj(query_in).view(batch, rows, parts.num_heads, parts.head_dim)
    key = parts.k_proj(normed).view(batch, length, parts.num_kv_heads, parts.head_dim)
    if parts.q_norm is not None:
        query = parts.q_norm(query)
    if parts.k_norm is not None:
        key = parts.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)

    cos, sin = adapter.rotary_tables(normed, sequence.positions)
    query_cos = torch.gather(cos, 1, query_index.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
    query_sin = torch.gather(sin, 1, query_index.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
    query = adapter.rotate(query, query_cos, query_sin)
    key = adapter.rotate(key, cos, sin)
    if parts.num_kv_heads != parts.num_heads:
        key = key.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=1)

    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * parts.scaling  # (B, H, R, N)
    key_slot = torch.arange(length, device=key.device)
    allowed = sequence.valid.unsqueeze(1) & (key_slot.view(1, 1, -1) <= query_index.unsqueeze(-1))
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=1)
    if query_valid is not None:
        probs = probs * query_valid.unsqueeze(-1)
    return probs


class Scorer:
    """What a decoder stage uses to score visual tokens at prefill, without attention weights.

    ``previous`` is the sequence that entered the layer before (FastV scores with the attention of
    layer K-1 and drops before layer K); ``current`` the one entering this layer.
    """

    def __init__(
        self, adapter: ModelAdapter, layer_index: int, current: Sequence, previous: Sequence | None
    ) -> None:
        self.adapter = adapter
        self.layer_index = layer_index
        self.current = current
        self.previous = previous

    def attention_to_tokens(self, query: str = "last", layer: str = "previous") -> torch.Tensor:
        """Attention paid to each slot of the current sequence, (B, N), averaged over heads.

        ``query``: ``"last"`` (the last prompt token of each sample) or ``"text"`` (mean over every
        prompt text token). ``layer``: ``"previous"`` (attention inside layer i-1; layer 0 uses its
        own) or ``"current"`` (inside layer i).
        """
        use_previous = layer == "previous" and self.previous is not None and self.layer_index > 0
        sequence = self.previous if use_previous else self.current
        score_layer = self.layer_index - 1 if use_previous else self.layer_index
        if query == "last":
            query_index = sequence.last_prompt_index().unsqueeze(1)
            query_valid = None
        elif query == "text":
            text = sequence.valid & sequence.is_prompt & ~sequence.is_visual
            query_index, query_valid = pack_index(text)
        else:
            raise ValueError(f"unknown query {query!r}: use 'last' or 'text'")
        probs = attention_rows(self.adapter, score_layer, sequence, query_index, query_valid)
        if query_valid is None:
            scores = probs[:, 0]
        else:
            scores = probs.sum(1) / query_valid.sum(1, keepdim=True).clamp_min(1)
        if sequence is self.current:
            return scores * sequence.valid
        return _align(scores, sequence, self.current)


def _align(scores: torch.Tensor, source: Sequence, target: Sequence) -> torch.Tensor:
    """Carry per-slot scores from one layout to another by slot identity (padding slots get 0)."""
    width = int(max(source.slot_id.max(), target.slot_id.max())) + 2
    dump = width - 1
    full = scores.new_zeros(scores.shape[0], width)
    full.scatter_(1, torch.where(source.valid, source.slot_id, dump), scores)
    full[:, dump] = 0
    aligned = torch.gather(full, 1, target.slot_id)
    return aligned * target.valid

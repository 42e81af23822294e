"""Flash-safe attention scores: a few query rows against all keys, recomputed from a layer's weights.

FastV-style methods need "how much does the last prompt token attend to each visual token at layer
i". Asking the model for ``output_attentions`` would force the eager N x N attention matrix (and
break ``sdpa``/FlashAttention). Instead we recompute only the rows we need from that layer's own
input norm, q/k projections and rotary embedding: the cost and memory are O(rows x N).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from tokenpress.core.tokens import pack_index
from tokenpress.runtime.sequence import Sequence

if TYPE_CHECKING:
    from tokenpress.runtime.adapter import ModelAdapter


def layer_query_key(
    adapter: ModelAdapter,
    layer_index: int,
    sequence: Sequence,
    query_index: torch.Tensor | None = None,
    projections: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries and keys layer ``layer_index`` computes from ``sequence`` (the hidden states
    entering it), as it computes them: input norm, projections, per-head norms, rotary embedding at
    the slots' positions. Returns query (B, H, R, d) of the slots ``query_index`` (B, R) (default:
    every slot) and key (B, H, N, d), repeated for grouped-query attention.

    ``projections`` replaces the layer's ``(q_proj, k_proj)`` (for example low-rank stand-ins).
    """
    parts = adapter.attention_parts(layer_index)
    q_proj, k_proj = projections if projections is not None else (parts.q_proj, parts.k_proj)
    normed = parts.input_norm(sequence.hidden)
    cos, sin = adapter.rotary_tables(normed, sequence.positions, layer_index)
    query_in, query_cos, query_sin = normed, cos, sin
    if query_index is not None:
        def rows(table: torch.Tensor) -> torch.Tensor:
            return torch.gather(table, 1, query_index.unsqueeze(-1).expand(-1, -1, table.shape[-1]))

        query_in, query_cos, query_sin = rows(normed), rows(cos), rows(sin)

    def heads(projected: torch.Tensor, count: int, norm: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        states = projected.view(*projected.shape[:2], count, parts.head_dim)
        states = norm(states) if norm is not None else states
        return adapter.rotate(states, cos, sin, heads_dim=2).transpose(1, 2)

    query = heads(q_proj(query_in), parts.num_heads, parts.q_norm, query_cos, query_sin)
    key = heads(k_proj(normed), parts.num_kv_heads, parts.k_norm, cos, sin)
    if parts.num_kv_heads != parts.num_heads:
        key = key.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=1)
    return query, key


def attention_rows(
    adapter: ModelAdapter,
    layer_index: int,
    sequence: Sequence,
    query_index: torch.Tensor,
    query_valid: torch.Tensor | None = None,
    per_head: bool = False,
) -> torch.Tensor:
    """Attention probabilities of the query slots ``query_index`` (B, R) at layer ``layer_index``.

    ``sequence`` must be the hidden states *entering* that layer. Returns (B, R, N) float32,
    averaged over heads ((B, H, R, N) with ``per_head``), over the keys the layer lets each query see
    (``ModelAdapter.score_allowed``: causal, real keys). Rows whose ``query_valid`` is false are all zero.
    """
    parts = adapter.attention_parts(layer_index)
    query, key = layer_query_key(adapter, layer_index, sequence, query_index)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * parts.scaling  # (B, H, R, N)
    allowed = adapter.score_allowed(layer_index, sequence, query_index)
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not per_head:
        probs = probs.mean(dim=1)
    if query_valid is not None:
        probs = probs * (query_valid.unsqueeze(1).unsqueeze(-1) if per_head else query_valid.unsqueeze(-1))
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

    def _scored(self, layer: str) -> tuple[Sequence, int]:
        """The sequence and the layer that score: layer i-1 and what entered it (``"previous"``; layer 0
        uses its own), or layer i and the current sequence (``"current"``)."""
        if layer not in ("previous", "current"):
            raise ValueError(f"unknown layer {layer!r}: use 'previous' or 'current'")
        if layer == "previous" and self.previous is not None and self.layer_index > 0:
            return self.previous, self.layer_index - 1
        return self.current, self.layer_index

    def attention_from(self, rows: torch.Tensor, layer: str = "previous", heads: str = "mean",
                       width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention that the slots ``rows`` (B, N bool, over the current sequence; text, such as
        SparseVLM's raters) pay to every slot of the current sequence.

        Returns ``(probs, valid)``: probs (B, R, N) averaged over heads, or (B, H, R, N) with
        ``heads="all"``, the R rows of each sample packed in slot order; valid (B, R) marks the real
        ones; ``width``, the most rows a sample has when the host knows it, spares reading it from the
        device. ``layer`` as in :meth:`attention_to_tokens`. Recomputed from the layer's own norm,
        projections and rotary table for these rows only: O(R x N) memory, no N x N matrix, with any
        attention backend. Columns of slots the scoring sequence did not hold are zero.
        """
        if heads not in ("mean", "all"):
            raise ValueError(f"unknown heads {heads!r}: use 'mean' or 'all'")
        sequence, score_layer = self._scored(layer)
        if sequence is not self.current:  # the same tokens, found by their identity in the other layout
            chosen = _align(rows.float(), self.current, sequence) > 0
        else:
            chosen = rows & sequence.valid
        query_index, query_valid = pack_index(chosen, width=width)
        probs = attention_rows(self.adapter, score_layer, sequence, query_index, query_valid,
                               per_head=heads == "all")
        if sequence is self.current:
            return probs * sequence.valid.view(probs.shape[0], *([1] * (probs.dim() - 2)), -1), query_valid
        return _align(probs, sequence, self.current), query_valid

    def attention_to_tokens(self, query: str = "last", layer: str = "previous") -> torch.Tensor:
        """Attention paid to each slot of the current sequence, (B, N), averaged over heads.

        ``query``: ``"last"`` (the last prompt token of each sample) or ``"text"`` (mean over every
        prompt text token). ``layer``: ``"previous"`` (attention inside layer i-1; layer 0 uses its
        own) or ``"current"`` (inside layer i).
        """
        sequence, score_layer = self._scored(layer)
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
    """Carry per-slot scores (B, ..., N) from one layout to another by slot identity along the last
    dimension (padding slots, and slots the source did not hold, get 0)."""
    width = max(source.slot_count, target.slot_count) + 1
    dump = width - 1
    middle = scores.shape[1:-1]
    flat = scores.reshape(scores.shape[0], -1, scores.shape[-1])
    index = torch.where(source.valid, source.slot_id, dump).unsqueeze(1).expand(-1, flat.shape[1], -1)
    full = flat.new_zeros(flat.shape[0], flat.shape[1], width)
    full.scatter_(2, index, flat)
    full[..., dump] = 0
    aligned = torch.gather(full, 2, target.slot_id.unsqueeze(1).expand(-1, flat.shape[1], -1))
    aligned = aligned * target.valid.unsqueeze(1)
    return aligned.reshape(scores.shape[0], *middle, target.slot_id.shape[1])

"""Folded bipartite merging: when a row must lose more tokens than one matching can merge (half of them), the
matching runs again on what is left - the metric merged with the tokens, size-weighted - until it has.
FOLDER does it in the encoder's last block; ToMe and FOLDER do it once after the encoder on a family that
runs no stage inside its encoder. Tensor code over a :class:`~tokenpress.TokenState`, no model."""

from __future__ import annotations

import torch

from tokenpress import TokenState
from tokenpress.core.matching import bipartite_assign, matching_scores, most_merges


def fold(tokens: TokenState, metric: torch.Tensor, merges: list[int], class_token: bool = False) -> TokenState:
    """``tokens`` with ``merges[i]`` tokens of row i merged away by repeated bipartite matchings on ``metric``
    (I, N, C, laid out like the tokens; a class token at slot 0 of it when ``class_token``), each matching
    merging at most half of what is left; survivors keep their order."""
    left = list(merges)
    while any(left):
        counts = tokens.counts_on_host()
        now = [min(wanted, most_merges(count)) for wanted, count in zip(left, counts, strict=True)]
        assign = bipartite_assign(metric, tokens.valid, now, class_token=class_token, keep_order=True)
        out = [count - merged for count, merged in zip(counts, now, strict=True)]
        width = max(out, default=0)
        # the metric merges with its tokens (a size-weighted mean), for the next matching
        metric = tokens.replace(metric.to(tokens.embeddings.dtype)).merge(assign, width).embeddings
        tokens = tokens.merge(assign, width, counts=out)
        left = [wanted - merged for wanted, merged in zip(left, now, strict=True)]
    return tokens


def fold_flops(tokens_in: int, tokens_out: int, width: int) -> float:
    """FLOPs of :func:`fold` from ``tokens_in`` to ``tokens_out`` tokens: one |A| x |B| similarity product of
    ``width``-wide metrics per matching (counted like torch's FLOP counter: 2 per multiply-add)."""
    count, left, total = tokens_in, tokens_in - tokens_out, 0.0
    while left > 0:
        now = min(left, most_merges(count))
        total += 2.0 * matching_scores(count) * width
        count, left = count - now, left - now
    return total

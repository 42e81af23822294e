"""The ``folder`` stage: ToMe's bipartite matching in the block that produces the features (by
default), *folded*: when a block must lose more than one matching can merge (half its tokens), the
matching runs again on what is left - the metric merged with the tokens, size-weighted - until it
has. Survivors keep their order (a merged token takes its B token's place)."""

from __future__ import annotations

from typing import Any

from tokenpress import MethodConfig, StageContext, TokenState
from tokenpress.core.matching import bipartite_assign, matching_scores, most_merges
from tokenpress_plugins.tome.method import Tome, TomeConfig


class FolderConfig(TomeConfig):
    """Parameters of ``folder``: give ``r`` (tokens each listed block removes, more than half allowed)
    or ``keep_ratio``."""


class Folder(Tome):
    """FOLDER (Wang et al., ICCV 2025): folded bipartite merging in the last encoder block(s)."""

    name = "folder"
    Config = FolderConfig
    description = "FOLDER: folded bipartite merging in the encoder's last block(s), many tokens at once."
    keep_order = True
    config: FolderConfig

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """The block whose output is the features (FOLDER's LLaVA setting: every merge there)."""
        return (num_layers - 1,)

    def most_merges(self, count: int) -> int:
        """Folding removes more than half: all but one token."""
        return count - 1

    def merge_tokens(self, tokens: TokenState, context: StageContext, merges: list[int]) -> TokenState:
        block = context.encoder_block
        metric = block.metric()
        left = list(merges)
        while any(left):
            counts = tokens.counts_on_host()
            now = [min(wanted, most_merges(count)) for wanted, count in zip(left, counts, strict=True)]
            assign = bipartite_assign(metric, tokens.valid, now, class_token=block.class_token, keep_order=True)
            out = [count - merged for count, merged in zip(counts, now, strict=True)]
            width = max(out, default=0)
            # the metric merges with its tokens (FOLDER: a size-weighted mean), for the next matching
            metric = tokens.replace(metric.to(tokens.embeddings.dtype)).merge(assign, width).embeddings
            tokens = tokens.merge(assign, width, counts=out)
            left = [wanted - merged for wanted, merged in zip(left, now, strict=True)]
        return tokens

    def stage_flops(self, shape: Any) -> float:
        """One similarity product per matching of the fold."""
        count, left, total = shape.tokens_in, shape.tokens_in - shape.tokens_out, 0.0
        while left > 0:
            now = min(left, most_merges(count))
            total += 2.0 * matching_scores(count) * (shape.encoder_width // shape.encoder_heads)
            count, left = count - now, left - now
        return total

"""The ``folder`` stage: ToMe's bipartite matching in the block that produces the features (by
default), *folded*: when a block must lose more than one matching can merge (half its tokens), the
matching runs again on what is left - the metric merged with the tokens, size-weighted - until it
has. Survivors keep their order (a merged token takes its B token's place)."""

from __future__ import annotations

from typing import Any

from tokenpress import MethodConfig, StageContext, TokenState
from tokenpress_plugins.tome.fold import fold, fold_flops
from tokenpress_plugins.tome.method import Tome, TomeConfig


class FolderConfig(TomeConfig):
    """Parameters of ``folder``: give ``r`` (tokens each listed block removes, more than half allowed)
    or ``keep_ratio``."""


class Folder(Tome):
    """FOLDER (Wang et al., ICCV 2025): folded bipartite merging in the last encoder block(s)."""

    name = "folder"
    Config = FolderConfig
    description = "FOLDER: folded bipartite merging in the encoder's last block(s), many tokens at once."
    approach = "similarity"
    paper = "Wang et al., ICCV 2025"
    year = 2025
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
        return fold(tokens, block.metric(), merges, class_token=block.class_token)

    def stage_flops(self, shape: Any) -> float:
        """One similarity product per matching of the fold."""
        return fold_flops(shape.tokens_in, shape.tokens_out, shape.encoder_width // shape.encoder_heads)

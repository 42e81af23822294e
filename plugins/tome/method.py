"""The ``tome`` stage: bipartite soft matching between the attention and the MLP of every listed
encoder block, the matched tokens merged by a size-weighted average (sizes and provenance kept by
:meth:`tokenpress.TokenState.merge`); the encoder's later blocks attend proportionally to sizes (the
core adds ``log(size)`` to their attention logits).

On a family that runs no stage inside its encoder (Qwen's windowed ViTs, whose mergers need every 2x2 unit
whole; InternVL's pixel shuffle) the stage runs once **after** the encoder: the same matching on the last
block's head-averaged keys, folded (repeated on what is left, as FOLDER does) until it has merged what the
blocks would have - ``keep_ratio`` of the tokens kept, or ``r`` per encoder block."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from tokenpress import EncoderKeys, Method, MethodConfig, Ratio, StageContext, TokenState, hookimpl, keep_counts_on_host
from tokenpress.core.errors import StackError
from tokenpress.core.matching import bipartite_assign, matching_scores, most_merges
from tokenpress_plugins.tome.fold import fold, fold_flops
from tokenpress_plugins.tome.schedule import block_merges

#: The metric of the after-encoder mode: the last encoder block's keys, averaged over heads (ToMe's metric).
AFTER_ENCODER_METRIC = EncoderKeys(layer=-1, heads="mean")


class TomeConfig(MethodConfig):
    """Parameters of ``tome``: give ``r`` (ToMe's) or ``keep_ratio``."""

    r: int | list[int] | None = Field(None, description="Tokens each listed encoder block merges away (ToMe's r); "
                                                        "a list gives one per listed block, in order.")
    inflection: float = Field(0.0, ge=-1.0, le=1.0, description="With one r: ToMe's schedule, from r(1-inflection) "
                                                               "at the first listed block to r(1+inflection) at the "
                                                               "last (0: constant; negative: decreasing).")
    keep_ratio: Ratio | None = Field(None, gt=0.0, le=1.0, description="Instead of r: every listed block keeps "
                                                                       "keep_ratio^(1/blocks) of its tokens, so "
                                                                       "about keep_ratio is left after the last.")

    @model_validator(mode="after")
    def _one_way(self) -> TomeConfig:
        if (self.r is None) == (self.keep_ratio is None):
            raise ValueError("give either r (tokens merged per block) or keep_ratio, not both or neither")
        values = [self.r] if isinstance(self.r, int) else self.r or []
        if any(value < 0 for value in values):
            raise ValueError(f"r must be >= 0 (got {self.r})")
        if self.inflection and not isinstance(self.r, int):
            raise ValueError("inflection shapes one r over the blocks; give r as a single number")
        return self


class Tome(Method):
    """ToMe (Bolya et al., ICLR 2023) inside the vision encoder: ``r`` merges per listed block."""

    name = "tome"
    Config = TomeConfig
    points = ("post_encoder",)
    encoder_blocks = True
    runs_after_encoder = True
    description = "Token Merging inside the vision encoder: bipartite soft matching on the block's keys (ToMe)."
    approach = "similarity"
    paper = "Bolya et al., ICLR 2023"
    year = 2023
    identity_params = {"r": 0}
    example_params = {"keep_ratio": 0.5}
    #: ToMe's output order (unmerged A tokens, then B) feeds the next block's alternation; FOLDER keeps order.
    keep_order = False
    config: TomeConfig

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """Every encoder block that feeds the features (ToMe merges in all of them)."""
        return tuple(range(num_layers))

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    #: Encoder blocks of the model (the after-encoder mode removes ``r`` per block); set at setup.
    encoder_layers: int | None = None

    @property
    def after_encoder(self) -> bool:
        """Whether this stage runs once after the encoder (it was resolved with no encoder block to act in)."""
        return not self.layers

    def required_signals(self) -> list[Any]:
        return [AFTER_ENCODER_METRIC] if self.after_encoder else []

    def setup(self, adapter: Any) -> None:
        self.encoder_layers = adapter.num_encoder_layers()
        if self.after_encoder:
            return
        if isinstance(self.config.r, list) and len(self.config.r) != len(self.layers):
            raise StackError(f"params.r lists {len(self.config.r)} values for {len(self.layers)} listed encoder blocks "
                             f"({list(self.layers)}); give one per block, or a single r")

    def merges(self, count: int, layer: int) -> int:
        """Tokens a row of ``count`` tokens loses in encoder block ``layer`` (what this stage does there)."""
        if layer not in self.layers:
            return 0
        config = self.config
        wanted = block_merges(count, self.layers.index(layer), len(self.layers), config.r, config.inflection,
                              config.keep_ratio)
        return min(wanted, self.most_merges(count))

    def most_merges(self, count: int) -> int:
        """The most tokens a row of ``count`` loses in one block: one matching's half."""
        return most_merges(count)

    def merge_tokens(self, tokens: TokenState, context: StageContext, merges: list[int]) -> TokenState:
        """One bipartite matching on the block's keys, ``merges[i]`` tokens of row i merged away."""
        block = context.encoder_block
        counts = tokens.counts_on_host()
        assign = bipartite_assign(block.metric(), tokens.valid, merges, class_token=block.class_token,
                                  keep_order=self.keep_order)
        out = [count - merged for count, merged in zip(counts, merges, strict=True)]
        return tokens.merge(assign, max(out, default=0), counts=out)

    def after_encoder_merges(self, count: int) -> int | None:
        """Tokens a row of ``count`` loses in the after-encoder mode: all the blocks' merges at once (None:
        ``r`` per block, before the model's encoder depth is known)."""
        config = self.config
        if config.keep_ratio is not None:
            return count - keep_counts_on_host([count], config.keep_ratio)[0]
        if isinstance(config.r, list):
            total = sum(config.r)
        elif self.encoder_layers is None:
            return None
        else:
            total = config.r * self.encoder_layers
        return min(total, count - 1)

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        if context.encoder_block is None:  # the after-encoder mode
            merges = [self.after_encoder_merges(count) for count in tokens.counts_on_host()]
            return fold(tokens, context.signals[AFTER_ENCODER_METRIC], merges)
        layer = context.encoder_block.layer
        merges = [self.merges(count, layer) for count in tokens.counts_on_host()]
        if not any(merges):
            return tokens
        return self.merge_tokens(tokens, context, merges)

    def promised_count_at(self, tokens_in: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.tensor([count - self.merges(count, layer) for count in tokens_in.tolist()], dtype=torch.long)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        """The promise where every listed block does the same (a keep ratio, or one constant r); after the
        encoder, what the fold leaves."""
        if self.after_encoder:
            merges = [self.after_encoder_merges(count) for count in tokens_in.tolist()]
            if None in merges:
                return None
            return torch.tensor([count - merged for count, merged in zip(tokens_in.tolist(), merges, strict=True)],
                                dtype=torch.long)
        config = self.config
        if config.keep_ratio is None and not (isinstance(config.r, int) and config.inflection == 0):
            return None  # a schedule: see promised_count_at
        return self.promised_count_at(tokens_in, self.layers[0]) if self.layers else tokens_in.clone()

    def pairwise_scores(self, tokens_in: int) -> int:
        """The |A| x |B| cosine similarities of one bipartite matching (ToMe's inherent pairwise step)."""
        return matching_scores(tokens_in)

    def stage_flops(self, shape: Any) -> float:
        """The matching's similarity product: every A key against every B key, head-averaged width (after
        the encoder: one per matching of the fold)."""
        if shape.tokens_out >= shape.tokens_in:
            return 0.0
        width = shape.encoder_width // shape.encoder_heads
        if self.after_encoder:
            return fold_flops(shape.tokens_in, shape.tokens_out, width)
        return 2.0 * matching_scores(shape.tokens_in) * width

"""acme's tokenpress plugin: keep the first ``keep_ratio`` of each image's visual tokens (raster order)."""

from __future__ import annotations

import torch

from tokenpress import Method, SelectingConfig, StageContext, TokenState, hookimpl, keep_count, keep_counts_on_host

__version__ = "0.1.0"


class KeepFirst(Method):
    """Keep the first ``keep_ratio`` of each image's visual tokens, before the projector."""

    name = "acme-keepfirst"
    Config = SelectingConfig
    points = ("post_encoder",)
    description = "Keep the first keep_ratio of each image's visual tokens (acme)."
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.5}
    config: SelectingConfig

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        kept = keep_counts_on_host(tokens.counts_on_host(), self.config.keep_ratio)  # host ints: no device read
        rank = tokens.valid.long().cumsum(-1)
        return tokens.keep(tokens.valid & (rank <= torch.tensor(kept, device=rank.device).unsqueeze(-1)), counts=kept)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [KeepFirst]


__all__ = ["KeepFirst"]

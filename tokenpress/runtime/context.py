"""What a stage sees besides the tokens: its stage, the model's signals, helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokenpress.core.errors import CompressionError
from tokenpress.runtime.scorer import Scorer
from tokenpress.runtime.sequence import Sequence

if TYPE_CHECKING:
    from tokenpress.core.stack import Stage
    from tokenpress.core.tokens import TokenState


@dataclass(frozen=True)
class EncoderBlock:
    """Where a stage acting inside the vision encoder runs (``context.encoder_block``): in block
    ``layer``, after its attention and before its MLP (where ToMe merges).

    ``keys`` (I, N, H, d) are this block's attention keys of the current tokens (what ToMe and FOLDER
    match on: ``keys.mean(-2)``), ``class_token`` whether a class token precedes them in the block
    (it is never in the state: never merged, size 1). The block's attention already weighs each key by
    its token's ``size`` (proportional attention: ``log(size)`` added to the logits)."""

    layer: int
    num_layers: int  # blocks that feed the features (the last one produces them)
    keys: torch.Tensor
    class_token: bool

    def metric(self) -> torch.Tensor:
        """(I, N, d): the keys averaged over heads (ToMe's similarity metric)."""
        return self.keys.mean(-2)


@dataclass
class StageContext:
    """Context of a pre-LLM stage (``post_encoder``, ``projector``, ``query_conditioned``)."""

    stage: Stage
    #: The encoder signals the stack's stages asked for (:mod:`tokenpress.core.signals`): by request
    #: (``signals[ClsAttention(layer=-2)]``), and by name when the stack asked for it one way only.
    signals: dict[Any, Any]
    project: Callable[[TokenState], TokenState]
    sample_keys: list[int]  # per sample: a fingerprint of its prompt, the same alone or batched
    image_rank: list[int]  # per image row: the image's place among its sample's images
    image_samples: list[int]  # per image row: the sample it belongs to
    prompt_embeddings: Callable[[int], torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: The model's :class:`~tokenpress.runtime.adapter.ModelAdapter`: widths, projector, encoder layers, without
    #: branching on the family.
    adapter: Any = None
    #: Set while a stage runs inside an encoder block (a ``post_encoder`` stage that lists ``layers``):
    #: the block and its keys. ``None`` after the encoder.
    encoder_block: EncoderBlock | None = None
    #: What the stages of one method share during one prefill (a fresh dict per prompt batch, one per
    #: method name): e.g. a ``query_conditioned`` stage leaves what it learned of the prompt for the
    #: method's ``decoder_layer`` stage. Decisions are made once per prompt: nothing here outlives it.
    state: dict[str, Any] = field(default_factory=dict)

    def text_embeddings(self, image_index: int) -> torch.Tensor:
        """Embedded prompt text (T, D) of the sample image ``image_index`` belongs to."""
        if self.prompt_embeddings is None:
            raise RuntimeError("text embeddings are only available at the query_conditioned point")
        return self.prompt_embeddings(image_index)

    def require_encoder_space(self, tokens: TokenState) -> None:
        """Refuse, in one sentence naming the stage, tokens a stage that replaces the projector cannot take."""
        if tokens.space != "encoder":
            raise CompressionError(f"{self.stage.label()}: {self.stage.method} replaces the projector and needs "
                                   "tokens in encoder space; put it before any stage that projects them")

    def random_key(self, image_index: int, seed: int) -> int:
        """A seed for one image that depends on ``seed``, the prompt and the image's place in it -
        never on the batch it was run in (host numbers: no device read)."""
        if self.encoder_block is not None:
            raise CompressionError(f"{self.stage.label()}: random_key() is not available inside the encoder (its rows "
                                   "are encoder runs, not yet matched to prompts); draw after the encoder")
        sample = self.image_samples[image_index]
        return self.sample_keys[sample] * 1_000_003 + self.image_rank[image_index] * 7919 + seed


@dataclass
class DecoderContext:
    """Context of a ``decoder_layer`` stage: the sequence entering layer ``layer_index`` at prefill."""

    stage: Stage
    layer_index: int
    num_layers: int
    sequence: Sequence
    scorer: Scorer
    sample_keys: list[int]  # as in StageContext
    adapter: Any = None  # the model's ModelAdapter, as in StageContext
    #: The sequence that entered decoder layer 0 (the LLM's input embeddings): what SparseVLM chooses
    #: its raters from. Its slots map to the current ones by ``slot_id``.
    initial: Sequence | None = None
    #: Shared by the stages of one method during one prefill, as in :attr:`StageContext.state` (e.g. the
    #: raters a stage chose at its first layer, for its later ones).
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def is_visual(self) -> torch.Tensor:
        """(B, N) bool: real visual slots of the current sequence."""
        return self.sequence.is_visual & self.sequence.valid

    def visual_counts(self) -> torch.Tensor:
        return self.sequence.visual_counts()

    def random_key(self, sample: int, seed: int) -> int:
        """A seed for one sample at this layer that does not depend on the batch."""
        return self.sample_keys[sample] * 1_000_003 + self.layer_index * 7919 + seed

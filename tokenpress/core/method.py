"""The base classes every compression method (built-in or third-party) derives from."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: The insertion points, in the order the compressed forward runs them, each with whether it acts
#: before the LLM (on a :class:`~tokenpress.TokenState`) or inside it (on each decoder layer). The
#: stack schema, the engine's order and the FLOPs model are all derived from this one table.
POINT_TABLE: tuple[tuple[str, bool], ...] = (
    ("post_encoder", True),  # the encoder's features, in encoder space
    ("projector", True),  # at the projector: encoder space in, a stage may project (or replace it)
    ("query_conditioned", True),  # projected tokens, with the prompt's text embeddings
    ("decoder_layer", False),  # before chosen decoder layers, at prefill
)
POINTS: tuple[str, ...] = tuple(name for name, _ in POINT_TABLE)
PRE_LLM_POINTS: tuple[str, ...] = tuple(name for name, before_llm in POINT_TABLE if before_llm)
#: The survey's families of methods (:attr:`Method.approach`), in the order the docs list them.
APPROACHES: tuple[str, ...] = ("transform", "similarity", "attention", "query")


def scaled_layer(layer: int, published_depth: int, num_layers: int) -> int:
    """The layer at the relative depth a paper's ``layer`` of ``published_depth`` has in a decoder of
    ``num_layers`` (halves rounded up): FastV's K = 2 of LLaVA-1.5's 32 layers is 2 of 28, 3 of 40, 1 of 12."""
    return math.floor(layer * num_layers / published_depth + 0.5)


class MethodConfig(BaseModel):
    """Base of every method's ``params`` model. Unknown fields are errors, and values are strict: YAML
    already types them, so ``"0.5"`` is not a number and ``true`` is not ``1`` (an ``int`` is accepted for
    a ``float``). A field whose type YAML cannot write (a ``Path``, an ``Enum``) takes
    ``Field(strict=False)``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's yes/no/true would otherwise pass as 1.0 / 0.0
        raise ValueError("expected a number, got a boolean")
    return value


#: A fraction in ``(0, 1]`` as a stack writes it: a number (never a boolean or a string), checked by the
#: field that uses it (``Field(gt=0.0, le=1.0)``). Importable from ``tokenpress``.
Ratio = Annotated[float, BeforeValidator(_no_bool)]


class SelectingConfig(MethodConfig):
    """Parameters shared by every method that keeps a fraction of the visual tokens."""

    keep_ratio: Ratio = Field(
        0.5, gt=0.0, le=1.0, description="Fraction of the visual tokens kept, in (0, 1]."
    )


class WeightedConfig(MethodConfig):
    """Parameters of a method with weights: where its fitted weights are (``tokenpress fit``)."""

    weights: str | None = Field(None, description="A weights file written by `tokenpress fit` for this method, "
                                                  "these parameters and this model; default: the initial weights.")


class Method:
    """A compression method. Subclass it, set the class attributes, implement one hook per point.

    Class attributes:

    * ``name`` - registry name used in stacks (``method: fastv``);
    * ``Config`` - the pydantic model of the stage's ``params``;
    * ``points`` - the insertion points the method supports; the first is the default ``at``;
    * ``description`` - one line for ``tokenpress plugins``;
    * ``identity_params`` / ``example_params`` - settings under which it changes nothing, and a
      typical compressing setting (used by the shared suites and sweeps).

    Encoder signals the method needs (e.g. ``{"cls_attention": -2}``) come from
    :meth:`required_signals`.

    Hooks are ordinary methods named after the points and marked with :data:`tokenpress.hookimpl`
    (see :mod:`tokenpress.core.hookspecs` for their arguments). One instance is made per stage.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    points: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    #: ``params`` under which the method changes nothing (``None``: it has no such setting). The
    #: shared conformance suite checks that these give the unmodified model's outputs.
    identity_params: ClassVar[dict[str, Any] | None] = None
    #: ``params`` of a typical compressing use, for the shared suites and examples.
    example_params: ClassVar[dict[str, Any]] = {}
    #: How the method decides, in the survey's families (:data:`APPROACHES`): ``transform`` (a fixed reshaping
    #: of the grid), ``similarity`` (merging or choosing by feature similarity or diversity), ``attention``
    #: (scores from the model's own attention), ``query`` (conditioned on the prompt, or learned queries);
    #: ``""``: none of them (a baseline). The docs' methods index groups methods by it.
    approach: ClassVar[str] = ""
    #: The method's paper as the docs cite it (``"Chen et al., ECCV 2024"``) and its year; empty where none.
    paper: ClassVar[str] = ""
    year: ClassVar[int | None] = None

    def __init__(self, config: MethodConfig, layers: tuple[int, ...] = ()) -> None:
        self.config = config
        self.layers = layers
        #: The method's own parts (see :mod:`tokenpress.core.weights`), built by :meth:`build_weights`.
        self.weights: torch.nn.Module | None = None

    @classmethod
    def default_point(cls) -> str:
        return cls.points[0]

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any] | None:
        """``params`` that keep about ``keep_ratio`` of the visual tokens (for sweeps such as
        ``tokenpress bench``); ``None`` when the method has no such knob. ``num_layers``: the decoder's
        depth where the sweep knows it (a method whose knob depends on it reads it; None: unknown)."""
        if "keep_ratio" in cls.Config.model_fields:
            return {**cls.example_params, "keep_ratio": keep_ratio}
        return None

    @classmethod
    def params_for_tokens(cls, tokens: int, keep_ratio: float) -> dict[str, Any] | None:
        """``params`` that keep about ``keep_ratio`` of an image's ``tokens`` visual tokens: a method whose
        knob is a count (a Q-Former's queries) needs the image's count; the default is
        :meth:`params_for_keep`."""
        return cls.params_for_keep(keep_ratio)

    #: True when the method acts inside the vision encoder's blocks: a ``post_encoder`` stage of it lists
    #: encoder blocks in ``layers`` (its hook then runs in each, between the block's attention and its
    #: MLP, where ToMe merges, with ``context.encoder_block`` set), or takes :meth:`default_layers`.
    encoder_blocks: ClassVar[bool] = False

    #: True when a method with :attr:`encoder_blocks` runs once after the encoder on a family that runs no
    #: stage inside its encoder (ToMe's and FOLDER's after-encoder mode), instead of being refused there. Such a
    #: stage lists no ``layers``; it is resolved so when the stack is attached (``Stage.after_encoder``).
    runs_after_encoder: ClassVar[bool] = False

    #: True when the method's ``decoder_layer`` decisions are :class:`~tokenpress.Route` (tokens skip one
    #: layer and come back) rather than :class:`~tokenpress.Keep`: the config-only FLOPs model then
    #: counts its promise at that layer only.
    routes: ClassVar[bool] = False

    #: True when the method's ``projector`` hook maps encoder-space tokens to the LLM's width itself, so
    #: the model's projector never runs (the FLOPs models then charge the method's own modules instead).
    replaces_projector: ClassVar[bool] = False
    @classmethod
    def returns_llm_space(cls, point: str) -> bool:
        """Whether a stage of this method at ``point`` returns tokens in the LLM's space: at ``projector`` a
        stage either replaces the projector or projects first (``context.project``), as every built-in does;
        ``query_conditioned`` receives projected tokens. A ``projector`` stage that returns encoder-space
        tokens says so by overriding this (the order check of a stack reads it)."""
        return point in ("projector", "query_conditioned")

    #: True when the method's output tokens stand for the whole image (no grid cell, like ``qformer``'s):
    #: laid out after the image like text, so LLaVA-NeXT adds no row newlines after them.
    summary_tokens: ClassVar[bool] = False
    #: True when a weights file may hold more parts than one stage builds (ALVTS's, made for every
    #: decoder layer, serves a stage that routes some of them); the parts a stage builds must be there.
    partial_weights: ClassVar[bool] = False

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...] | None:
        """Layers of a stage that lists none (``None``: it must list them): decoder layers of a
        ``decoder_layer`` stage, or, for a method with :attr:`encoder_blocks`, encoder blocks of a
        ``post_encoder`` stage (``num_layers`` is then the number of blocks that feed the features).

        Resolved when the stack is attached (or simulated), once the model's depth is known.
        """
        return None

    def layers_problem(self) -> str | None:
        """Why this stage cannot act at its ``layers`` (None when it can): e.g. FastV scoring with the previous
        layer's attention has none before layer 0. Asked when a stack is loaded (for the layers it lists) and
        when it is resolved against a model (for its method's default layers)."""
        return None

    @classmethod
    def has_default_layers(cls) -> bool:
        return cls.default_layers.__func__ is not Method.default_layers.__func__  # type: ignore[attr-defined]

    @classmethod
    def calibrate(cls, model: Any, stage: dict[str, Any], train: list[dict[str, torch.Tensor]],
                  held_out: list[dict[str, torch.Tensor]], *, epochs: int, lr: float, seed: int,
                  progress: bool = True) -> Any:
        """Learn this method's calibrated state for ``stage`` (its stack entry, as a dict) on ``model``
        from the processed ``train`` batches; measure it on ``held_out``. Returns a
        :class:`tokenpress.tools.calibration.Calibration`. Methods with nothing to calibrate keep this default."""
        raise NotImplementedError

    @classmethod
    def can_calibrate(cls) -> bool:
        return cls.calibrate.__func__ is not Method.calibrate.__func__  # type: ignore[attr-defined]

    def required_signals(self) -> list[Any] | dict[str, Any]:
        """Encoder signals this stage needs: typed requests (:mod:`tokenpress.core.signals`), e.g.
        ``[ClsAttention(layer=-2), EncoderKeys(layer=-2)]`` (the older ``{"cls_attention": -2}`` form,
        the value being the layer, still works). Each distinct request is computed once per prefill."""
        return {}

    def pairwise_scores(self, tokens_in: int) -> int:
        """How many pairwise scores (float elements, at most ``tokens_in`` squared) the method's algorithm
        forms by nature for one image row of ``tokens_in`` tokens, at once: ToMe's bipartite matching
        scores every token of one set against every token of the other (|A| x |B|). The profiling
        contract allows exactly this much quadratic memory (float32, one matrix per row) and holds the
        rest to linear growth; 0 (the default) for a method that forms no such matrix."""
        return 0

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        """Tokens per image (or per sample, for decoder stages) this stage promises to output.

        ``None`` means the method makes no promise (adaptive methods). The profiling contract
        checks the promise against what the stage really did.
        """
        return None

    def promised_count_at(self, tokens_in: torch.Tensor, layer: int) -> torch.Tensor | None:
        """:meth:`promised_count` of the stage's application at ``layer`` (the encoder block of a
        stage inside the encoder, whose promise may follow a schedule over its blocks); the default
        is the same promise at every layer."""
        return self.promised_count(tokens_in)

    def expected_grid(self, height: int, width: int) -> tuple[int, int] | None:
        """The grid an image row of ``height`` x ``width`` cells becomes, for a method that re-grids
        it (``pool``, ``ldp``, ``pixel_unshuffle``); ``None`` for one that selects or summarises. The
        FLOPs model uses it, and the profiling contract checks it against what the stage did."""
        return None

    def scoring_flops(self, item: Any) -> float:
        """FLOPs a ``decoder_layer`` stage spends deciding at one layer (``item``: a
        :class:`tokenpress.core.flops.ScoringInput`), e.g. FastV's attention scores; counted like
        :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, 2 per multiply-add)."""
        return 0.0

    def stage_flops(self, shape: Any) -> float:
        """FLOPs of the method's own modules on one image row at a pre-LLM point (``shape``: a
        :class:`tokenpress.core.flops.StageShape`), counted like ``scoring_flops``. A method that replaces
        the projector declares its replacement here; the contract kit checks it against a counter."""
        return 0.0

    @classmethod
    def config_for_model(cls, config: MethodConfig, encoder_layers: int | None) -> MethodConfig:
        """``config`` with the parameters that default to a depth resolved for the model at hand
        (``encoder_layers``: its vision encoder's depth; None where unknown). A paper's encoder layer left
        unset is put at the same relative depth (:func:`scaled_layer`), as :meth:`default_layers` does for
        decoder layers. Called when a stack is resolved for a model; default: ``config`` unchanged."""
        return config

    def setup(self, adapter: Any) -> None:
        """Called once when the stack is attached, before any forward pass, with the model's
        :class:`~tokenpress.runtime.adapter.ModelAdapter` (validate, build buffers). Raising leaves the
        model untouched."""

    def build_weights(self, adapter: Any) -> torch.nn.Module | None:
        """The method's own ``nn.Module`` parts for this model, initialised (``None``: it has none).

        Called after :meth:`setup`. The core keeps them outside the model's ``state_dict``, moves
        them to the model's device and dtype before each compressed forward, loads
        ``params.weights`` into them (the config derives from :class:`WeightedConfig`) and drops
        them on detach. Build them deterministically (a seeded generator, not the global random
        state), so two attaches give the same initial weights.
        """
        return None

    def weights_shaping(self) -> dict[str, Any]:
        """The parameters that shape :meth:`build_weights`' parts (checked against a weights file)."""
        return {}

    def weights_fingerprint(self, adapter: Any) -> dict[str, Any]:
        """Numbers of the model's own weights that this method's weights were made against (stored in
        a weights file, compared on load), beyond the embeddings every file is checked against."""
        return {}

    @classmethod
    def weights_made_by(cls) -> str:
        """The command that makes this method's weights: its own ``calibrate``, else ``tokenpress fit``."""
        return "tokenpress calibrate" if cls.can_calibrate() else "tokenpress fit"

    def teardown(self) -> None:
        """Undo :meth:`setup` when the stack is detached (the default drops the method's weights)."""
        self.weights = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, layers={self.layers})"

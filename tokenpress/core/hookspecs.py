"""The hook specifications of tokenpress, in one place.

There are three kinds of hooks.

**Registration hooks** are implemented by plugin modules (found through the ``tokenpress.plugins``
entry-point group, or registered by hand) and tell the core what they provide:
:func:`tokenpress_register_methods` and :func:`tokenpress_register_adapters`.

**Insertion-point hooks** are implemented by the stage objects of a stack (instances of a
:class:`tokenpress.Method` subclass). There is one per insertion point of the data flow::

    pixel_values -> vision encoder -> [post_encoder] -> projector -> [projector] -> visual tokens
    input_ids -> text embeddings ------------------------------> [query_conditioned]
    merged sequence -> decoder layer 0 ... L-1 -> lm_head, with [decoder_layer(i)] before each layer i

A method implements the hook of every point it supports; pluggy checks the argument names when a
stage is registered. Stages run one by one in the order the stack lists them (never in pluggy's
LIFO order): each receives what the previous stage returned.

**Observation hooks** are ``wrapper=True`` hooks around every stage call
(:func:`tokenpress_run_stage`) and around every compressed prefill
(:func:`tokenpress_prefill`), used by the profiler and reporters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from tokenpress.core.decisions import LayerDecision
    from tokenpress.core.method import Method
    from tokenpress.core.stack import Stage
    from tokenpress.core.tokens import TokenState
    from tokenpress.runtime.adapter import ModelAdapter
    from tokenpress.runtime.context import DecoderContext, StageContext

PROJECT = "tokenpress"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration -------------------------------------------------------------------------------


@hookspec
def tokenpress_register_methods() -> list[type[Method]]:
    """Return the :class:`~tokenpress.Method` subclasses this plugin provides.

    Each class carries its registry ``name`` (an open string such as ``"fastv"`` or
    ``"acme-visionzip"``), its pydantic ``Config`` class and the insertion ``points`` it supports.
    Two plugins registering the same name is an error.
    """


@hookspec
def tokenpress_register_adapters() -> list[type[ModelAdapter]]:
    """Return the :class:`~tokenpress.runtime.adapter.ModelAdapter` subclasses (model families) provided."""


# --- insertion points (implemented by stage objects) --------------------------------------------


@hookspec
def post_encoder(tokens: TokenState, context: StageContext) -> TokenState:
    """Transform the vision encoder's patch features (encoder space), before the projector.

    ``tokens`` holds every image of the batch with its patch grid; ``context.signals`` holds the
    encoder signals the method asked for (for example the CLS attention of an encoder layer).
    Return the new token state (use the :class:`~tokenpress.TokenState` operations).
    """


@hookspec
def projector(tokens: TokenState, context: StageContext) -> TokenState:
    """Act at the projector: receive tokens in encoder space or already projected.

    ``context.project(tokens)`` applies the model's own projector (once; it is a no-op on tokens
    already in LLM space). A method may also replace the projector by returning tokens it projected
    itself (``tokens.replace(..., space="llm")``). Whatever is still in encoder space after the last
    projector stage goes through the model's projector.
    """


@hookspec
def query_conditioned(tokens: TokenState, context: StageContext) -> TokenState:
    """Select or merge projected visual tokens knowing the prompt.

    ``context.text_embeddings(image_index)`` gives the embedded prompt text of the sample that image
    belongs to (prompt only: never generated tokens).
    """


@hookspec
def decoder_layer(context: DecoderContext) -> LayerDecision | None:
    """Decide, before decoder layer ``context.layer_index`` runs at prefill, what happens to visual tokens.

    Return :class:`~tokenpress.Keep` (drop the other visual tokens for this and every later layer),
    :class:`~tokenpress.Route` (only these visual tokens go through this layer; the others skip it
    unchanged and rejoin afterwards) or ``None`` (no change). Text tokens are always kept and always
    processed. ``context.scorer`` gives flash-safe attention scores. The decision is made once per
    prompt; decoding steps reuse it.
    """


# --- observation --------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenpress_run_stage(stage: Stage, method: Method, point: str, payload: Any, call: Any, layer: int | None) -> Any:
    """Run one stage: ``call(payload)`` returns the stage's result.

    ``layer`` is the decoder layer of a ``decoder_layer`` call, the encoder block of a ``post_encoder``
    stage acting inside the encoder, and ``None`` elsewhere (an implementation may leave it out).

    The core implements this hook last; observers implement it with ``wrapper=True`` to time, count
    or record every stage (``result = yield``).
    """


@hookspec(firstresult=True)
def tokenpress_prefill(adapter: ModelAdapter, batch_size: int, call: Any) -> Any:
    """Run one compressed prefill (``call()``); observers wrap it with ``wrapper=True``."""

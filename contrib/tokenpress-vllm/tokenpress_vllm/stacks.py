"""Which tokenpress stacks vLLM can serve, and what each does to an image's placeholder count and layout.

vLLM writes an image's placeholder tokens into the prompt (and, on Qwen2.5-VL, fixes their M-RoPE
positions) when the request arrives, before the image is encoded. So a served stack's stages must act
before the LLM and promise how many tokens they leave from the image's size alone; the count itself
comes from tokenpress's own config-only simulation (:func:`tokenpress.core.flops.simulate`), and the
pre-LLM pipeline checks at run time that the stages kept their promise.

A server is given its stacks through the model config (``--hf-overrides``)::

    {"tokenpress": {"stacks": {"pool": {...stack...}, "none": {"name": "none", "stages": []}},
                    "default": "pool"}}

and a request picks one by name with ``mm_processor_kwargs={"tokenpress_stack": "none"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tokenpress.core.errors import TokenpressError
from tokenpress.core.flops import FlopsError, simulate
from tokenpress.core.stack import Stack, Stage, load_stack

#: The attribute of the model config (``--hf-overrides``) that holds the served stacks.
CONFIG_KEY = "tokenpress"
#: The ``mm_processor_kwargs`` key a request chooses a stack with (and the per-image field carrying it).
REQUEST_KEY = "tokenpress_stack"
#: Points whose stages vLLM can serve: before the LLM, without the prompt.
SERVED_POINTS = ("post_encoder", "projector")

Layout = Literal["grid", "summary", "selected"]


class NotServable(TokenpressError, ValueError):
    """A stack (or a request's choice of one) vLLM cannot serve; the message is one sentence."""


@dataclass(frozen=True)
class ImageLayout:
    """What a served stack leaves of one image, known before the image is encoded.

    ``kind`` is ``grid`` when each row is still a full (possibly coarser) grid, ``summary`` when only
    summary tokens are left (a Q-Former's), ``selected`` when stages dropped or merged tokens of a grid;
    ``grids`` are the rows' final (t, h, w) for ``grid``, ``count`` the tokens the LLM sees.
    """

    kind: Layout
    grids: tuple[tuple[int, int, int], ...]
    count: int


@dataclass(frozen=True)
class ServedStack:
    """One stack a server offers: its name (what requests choose) and the validated tokenpress stack."""

    name: str
    stack: Stack
    index: int

    @property
    def compact(self) -> bool:
        return self.stack.positions == "compact"


def _refusal(stage: Stage) -> str | None:
    """Why vLLM cannot serve ``stage`` (None when it can)."""
    label = stage.label()
    if stage.point == "decoder_layer":
        return (f"stage {label}: vLLM runs its own decoder layers, so tokenpress can serve only stages that act "
                f"before the LLM ({', '.join(SERVED_POINTS)})")
    if stage.point == "query_conditioned":
        return (f"stage {label}: {stage.method} reads the prompt, and vLLM encodes (and caches) each image apart "
                "from its prompt")
    method = stage.method_class(stage.config, stage.layers)
    probe = torch.tensor([64], dtype=torch.long)
    if method.expected_grid(8, 8) is not None:
        return None
    promises = ([method.promised_count_at(probe, layer) for layer in stage.layers] if stage.inside_encoder
                else [method.promised_count(probe)])
    if any(promise is None for promise in promises):
        return (f"stage {label}: {stage.method} keeps a number of tokens that depends on the image's content, and "
                "vLLM fixes each image's placeholder count before the image is encoded")
    return None


def _family_blocks(config: Any) -> tuple[int, int | None]:
    """(decoder layers, encoder blocks that feed the features) of a model config, as tokenpress resolves
    a stack's default layers (``None``: the family runs no stage inside its encoder)."""
    from tokenpress.core.flops import family_costs

    family = family_costs(config)
    return family.decoder.layers, family.feature_blocks()


def where(stack: Stack) -> str:
    """How errors name a stack: its file, or its name when it was given as a mapping."""
    return f"stack {stack.name!r}" if stack.source == "<dict>" else stack.source


def check_servable(stack: Stack, config: Any) -> Stack:
    """The stack with its default layers resolved for ``config``'s model, or :class:`NotServable` with one
    sentence saying why vLLM cannot serve it."""
    layers, blocks = _family_blocks(config)
    stack = stack.resolved(layers, blocks)
    for stage in stack.stages:
        problem = _refusal(stage)
        if problem:
            raise NotServable(f"{where(stack)}: {problem}")
    if not stack.stages:
        return stack
    layout = image_layout(stack, config, None)  # raises where the count cannot be known before encoding
    if stack.positions == "original" and layout.kind == "selected":
        raise NotServable(f"{where(stack)}: vLLM numbers an image's placeholders one after another, so a stack whose "
                          "stages drop or merge tokens of the grid must say `positions: compact` (positions: "
                          "original is served for re-gridding and summarising stages such as pool or qformer)")
    return stack


def _llm_grids(config: Any, image_size: tuple[int, int] | None) -> tuple[tuple[int, int, int], ...]:
    """The uncompressed rows' (t, h, w) grids of one image, as tokenpress's adapter lays them out."""
    from tokenpress.core.flops import family_costs

    return tuple(row.grid for row in family_costs(config).image(image_size).rows)


def image_layout(stack: Stack, config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
    """What ``stack`` (resolved, servable) leaves of an image of ``image_size`` (see :func:`simulate`'s
    ``image_size``: None on LLaVA-1.5, the original (height, width) on LLaVA-NeXT, the size after the
    processor's resize on Qwen2.5-VL)."""
    if image_size is None and getattr(config, "model_type", None) != "llava":
        image_size = _default_size(config)
    grids = list(_llm_grids(config, image_size))
    kind: Layout = "grid"
    for stage in _in_data_flow_order(stack):
        method = stage.method_class(stage.config, stage.layers)
        if kind == "summary":
            continue
        if stage.method_class.summary_tokens:
            kind = "summary"
            continue
        shrunk = [method.expected_grid(h, w) for _, h, w in grids]
        if all(grid is not None for grid in shrunk):
            grids = [(t, h, w) for (t, _, _), (h, w) in zip(grids, shrunk, strict=True)]
            continue
        counts = torch.tensor([t * h * w for t, h, w in grids], dtype=torch.long)
        promises = ([method.promised_count_at(counts, layer) for layer in stage.layers] if stage.inside_encoder
                    else [method.promised_count(counts)])
        if any(promise is None or not torch.equal(torch.as_tensor(promise), counts) for promise in promises):
            kind = "selected"
    count = token_count(stack, config, image_size)
    return ImageLayout(kind, tuple(grids) if kind == "grid" else (), count)


def _in_data_flow_order(stack: Stack) -> list[Stage]:
    """The stages in the order a prefill runs them: inside the encoder, then each pre-LLM point in turn."""
    inside = [stage for stage in stack.stages if stage.inside_encoder]
    outside = [stage for point in SERVED_POINTS for stage in stack.stages
               if stage.point == point and not stage.inside_encoder]
    return inside + outside


def _default_size(config: Any) -> tuple[int, int]:
    """An image size to check a stack against where the family's count depends on it."""
    if getattr(config, "model_type", None) == "llava_next":
        side = config.vision_config.image_size
        return side, side * 2
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return unit * 8, unit * 8


def token_count(stack: Stack, config: Any, image_size: tuple[int, int] | None) -> int:
    """Visual tokens the LLM sees for one image under ``stack`` (its placeholders), from the config alone."""
    try:
        breakdown = simulate(config, stack, 0, image_size)
    except FlopsError as exc:
        raise NotServable(f"{where(stack)}: vLLM needs each image's token count before the image is encoded, "
                          f"and tokenpress cannot predict it for this stack ({_first_clause(exc)})") from None
    return breakdown.layer_tokens[0] if breakdown.layer_tokens else breakdown.visual_tokens


def _first_clause(exc: Exception) -> str:
    text = str(exc).split("; the config-only FLOPs", 1)[0].split(" (use the measured", 1)[0]
    return text.rstrip(".")


class ServingStacks:
    """The stacks one server offers (from the model config), validated for its model."""

    def __init__(self, config: Any, stacks: dict[str, Stack | dict | str | Path], default: str,
                 checkpoint: str | None = None) -> None:
        if not stacks:
            raise NotServable(f"`{CONFIG_KEY}.stacks` names no stack; give at least one")
        if default not in stacks:
            raise NotServable(f"`{CONFIG_KEY}.default` is {default!r}, which is not one of the stacks "
                              f"({', '.join(sorted(stacks))})")
        self.config = config
        #: The checkpoint folder the vision side is loaded from (None: the one vLLM serves).
        self.checkpoint = checkpoint
        self.by_name: dict[str, ServedStack] = {}
        for index, (name, source) in enumerate(stacks.items()):
            stack = check_servable(load_stack(source), config)
            self.by_name[name] = ServedStack(name, stack, index)
        self.default = default
        self.by_index = list(self.by_name.values())
        self._layouts: dict[tuple[int, tuple[int, int] | None], ImageLayout] = {}

    @classmethod
    def from_config(cls, config: Any) -> ServingStacks:
        """The stacks in ``config.tokenpress`` (what :func:`tokenpress_vllm.hf_overrides` writes)."""
        settings = getattr(config, CONFIG_KEY, None)
        if not isinstance(settings, dict) or "stacks" not in settings:
            raise NotServable(f"this model config has no `{CONFIG_KEY}` settings with `stacks`; pass them with "
                              "--hf-overrides (tokenpress_vllm.hf_overrides writes them)")
        stacks = settings["stacks"]
        return cls(config, dict(stacks), settings.get("default", next(iter(stacks), "")), settings.get("checkpoint"))

    def choose(self, name: object) -> ServedStack:
        """The stack a request asked for by name (None: the server's default)."""
        if name is None:
            return self.by_name[self.default]
        if not isinstance(name, str) or name not in self.by_name:
            raise NotServable(f"mm_processor_kwargs.{REQUEST_KEY}: {name!r} is not one of this server's stacks "
                              f"({', '.join(self.by_name)})")
        return self.by_name[name]

    def layout(self, served: ServedStack, image_size: tuple[int, int] | None) -> ImageLayout:
        """:func:`image_layout` of one served stack, remembered per image size (asked once per request)."""
        key = (served.index, image_size)
        if key not in self._layouts:
            self._layouts[key] = image_layout(served.stack, self.config, image_size)
        return self._layouts[key]

    def __getitem__(self, index: int) -> ServedStack:
        return self.by_index[index]

    def __iter__(self):
        return iter(self.by_index)

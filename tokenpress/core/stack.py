"""Stacks: YAML files (or dicts) that list compression stages, validated before any forward pass.

```yaml
name: fastv-after-pooling
positions: original        # or compact
stages:
  - method: pool
    at: post_encoder       # optional: defaults to the method's first point
    params: {kernel: 2, mode: avg}
  - method: fastv
    layers: [2]
    params: {keep_ratio: 0.5}
```

Stages run in the order listed. Every error names the file, the stage and the field.
"""

from __future__ import annotations

import difflib
import json
import os
import reprlib
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenpress.core.errors import StackError
from tokenpress.core.method import POINTS, PRE_LLM_POINTS, Method, MethodConfig
from tokenpress.core.registry import get_registry
from tokenpress.core.signals import as_requests

Point = Literal[POINTS]  # type: ignore[valid-type]  # one of POINTS (a tuple subscript spells them out)


class StageSpec(BaseModel):
    """One stage as written in the stack file (strict: ``layers: [true]`` is not layer 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: str = Field(description="Registered method name, e.g. 'fastv' (see `tokenpress plugins`).")
    at: Point | None = Field(None, description="Insertion point; defaults to the method's first point.")
    layers: list[int] | None = Field(
        None, description="Decoder layers the stage acts before (decoder_layer stages), or the vision encoder's "
                          "blocks it acts inside (post_encoder stages of methods that act inside the encoder).")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's parameters.")


class StackSpec(BaseModel):
    """A whole stack file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="A name for reports.")
    description: str | None = None
    positions: Literal["original", "compact"] = Field(
        "original",
        description="original: surviving tokens keep their positions; compact: re-index them.",
    )
    stages: list[StageSpec] = Field(
        description="The stages, in the order they run; `stages: []` is the identity stack (a stack without "
                    "the key is a mistake, not an empty stack).")


@dataclass(frozen=True)
class Stage:
    """A validated stage: its method class, point, layers and parsed config."""

    index: int
    method: str
    method_class: type[Method]
    point: str
    layers: tuple[int, ...]
    config: MethodConfig
    #: Resolved against a family that runs no stage inside its encoder: the method's after-encoder mode.
    after_encoder: bool = False

    @property
    def inside_encoder(self) -> bool:
        """True for a ``post_encoder`` stage of a method that acts inside the encoder's blocks."""
        return self.point == "post_encoder" and self.method_class.encoder_blocks and not self.after_encoder

    def resolved(self, num_layers: int, source: str = "<dict>", encoder_blocks: int | None = None,
                 encoder_layers: int | None = None) -> Stage:
        """This stage with its method's default layers filled in, for a decoder of ``num_layers`` layers
        (an encoder stage: for ``encoder_blocks`` blocks feeding the features; None: the family runs no
        stage inside its encoder, which attaching refuses), and its parameters that default to a depth
        resolved for a vision encoder of ``encoder_layers`` layers (:meth:`Method.config_for_model`)."""
        config = self.method_class.config_for_model(self.config, encoder_layers)
        stage = self if config == self.config else dataclass_replace(self, config=config)
        if stage.layers or not (stage.point == "decoder_layer" or stage.inside_encoder):
            return stage
        decoder = stage.point == "decoder_layer"
        count, what = (num_layers, "decoder layer") if decoder else (encoder_blocks, "encoder block")
        if count is None:
            if not decoder and stage.method_class.runs_after_encoder:
                return dataclass_replace(stage, after_encoder=True)  # runs once after the encoder
            return stage
        layers = stage.method_class.default_layers(stage.config, count)
        if not layers:
            raise StackError(f"{source}: stages[{stage.index}].layers: method {stage.method!r} chose no {what} "
                             f"for this model ({count}); list the layers")
        stage = dataclass_replace(stage, layers=tuple(int(layer) for layer in layers))
        _check_layers_of(stage, source)
        return stage

    def as_dict(self, **params: Any) -> dict[str, Any]:
        """This stage as a stack entry (``params`` override some of its parameters)."""
        entry: dict[str, Any] = {"method": self.method, "at": self.point,
                                 "params": {**self.config.model_dump(), **params}}
        if self.layers:
            entry["layers"] = list(self.layers)
        return entry

    def label(self) -> str:
        where = f"{self.point}" + (f"@{_layer_list(self.layers)}" if self.layers else "")
        where += ", after the encoder" if self.after_encoder else ""
        return f"{self.index}:{self.method}({where})"


def _check_layers_of(stage: Stage, source: str) -> None:
    """Refuse, naming the file and the stage, layers its method cannot act at (``Method.layers_problem``)."""
    if not stage.layers:
        return
    problem = stage.method_class(stage.config, stage.layers).layers_problem()
    if problem is not None:
        raise StackError(f"{source}: stages[{stage.index}].layers: {problem}")


def _layer_list(layers: tuple[int, ...]) -> str:
    """``0,1,2,3,5`` -> ``0-3,5``: runs of three or more consecutive layers as a range."""
    parts: list[str] = []
    run: list[int] = []
    for layer in [*layers, None]:
        if run and (layer is None or layer != run[-1] + 1):
            parts += [f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(value) for value in run]
            run = []
        if layer is not None:
            run.append(layer)
    return ",".join(parts)


@dataclass(frozen=True)
class Stack:
    """A validated stack, ready to attach."""

    name: str
    positions: str
    stages: tuple[Stage, ...]
    source: str = "<dict>"
    description: str | None = None

    def at(self, point: str) -> list[Stage]:
        return [stage for stage in self.stages if stage.point == point]

    def decoder_stages(self, layer: int) -> list[Stage]:
        return [s for s in self.stages if s.point == "decoder_layer" and layer in s.layers]

    def is_empty(self) -> bool:
        return not self.stages

    def as_dict(self) -> dict[str, Any]:
        """The stack as the mapping :func:`load_stack` takes."""
        return {"name": self.name, "positions": self.positions, "stages": [stage.as_dict() for stage in self.stages]}

    def resolved(self, num_layers: int, encoder_blocks: int | None = None, encoder_layers: int | None = None) -> Stack:
        """The stack with every stage's default layers filled in for a ``num_layers``-layer decoder (and
        ``encoder_blocks`` encoder blocks feeding the features; None: the family runs no stage inside its
        encoder, so a method that can runs after it) and its depth-relative parameters for an encoder of
        ``encoder_layers`` layers (None: unknown, the published values), its stage order checked again (a
        stage that moved after the encoder runs in its listed place among the post-encoder stages)."""
        resolved = dataclass_replace(self, stages=tuple(
            stage.resolved(num_layers, self.source, encoder_blocks, encoder_layers) for stage in self.stages))
        problem = order_problem(resolved)
        if problem is not None:
            raise StackError(f"{self.source}: {problem}")
        return resolved


#: Error messages quote at most this many characters of a bad value.
QUOTE_LIMIT = 100
#: A stack file may stand for at most this many YAML values once anchors and aliases are expanded.
MAX_VALUES = 10_000


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters (long values are cut, and
    nested ones are not expanded in full: an aliased structure may be exponentially large)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    short.maxlevel = 4
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias expanded (counted once per node)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, memo)
            if size > MAX_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            size += _expanded_size(key, memo) + _expanded_size(child, memo)
            if size > MAX_VALUES:
                break
    memo[id(node)] = size
    return size


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing duplicate keys (the plain one silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise StackError(
                f"duplicate key {quote(key)} at line {key_node.start_mark.line + 1}, column "
                f"{key_node.start_mark.column + 1}"
            )
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _distinct_nodes(node: yaml.Node, seen: set[int]) -> int:
    """How many distinct nodes the document holds (an alias counted once: the file's own size)."""
    if id(node) in seen:
        return 0
    seen.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
    return 1 + sum(_distinct_nodes(child, seen) for child in children)


def _load_yaml(text: str) -> Any:
    """Safe-load one YAML document, refusing duplicate keys and alias bombs (a document that its aliases
    expand beyond :data:`MAX_VALUES` values; a long file without aliases is only as large as it looks)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > max(MAX_VALUES, _distinct_nodes(node, set())):
            raise StackError(f"the YAML stands for more than {MAX_VALUES} values once its anchors and aliases are "
                             "expanded; a stack is a short list of stages")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read(source: str | Path | dict) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "<dict>"
    if not isinstance(source, str | os.PathLike):
        raise StackError(f"a stack is a path to a YAML file, a mapping or a tokenpress.Stack, not a "
                         f"{type(source).__name__} ({quote(source)})")
    path = Path(source)
    label = str(path)
    if not path.exists():
        raise StackError(f"{label}: no such stack file")
    if not path.is_file():
        raise StackError(f"{label}: not a file (a stack is a YAML file)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise StackError(f"{label}: cannot read the stack file ({exc.strerror or exc})") from None
    if not text.strip():
        raise StackError(f"{label}: the file is empty; a stack needs at least `name:` and `stages:`")
    try:
        data = _load_yaml(text)
    except StackError as exc:
        raise StackError(f"{label}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StackError(f"{label}: not valid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as exc:  # a value YAML parses but Python refuses (a 5000-digit number)
        raise StackError(f"{label}: cannot read a value of the YAML ({quote(str(exc).splitlines()[0])})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "nothing"
        raise StackError(f"{label}: a stack must be a mapping with `name:` and `stages:`, found {kind}")
    return data, label


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        name = str(part) if len(str(part)) <= 60 else str(part)[:45] + "..."
        path += f"[{part}]" if isinstance(part, int) else (f".{name}" if path else name)
    return path


def _describe(error: dict) -> str:
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field is missing"
    if "input" in error and error["type"] not in ("missing",) and not isinstance(error["input"], dict):
        message += f" (got {quote(error['input'])})"
    return message


def _spec_error(label: str, exc: ValidationError, prefix: tuple = (), allowed: list[str] | None = None) -> StackError:
    errors = exc.errors()
    # A misspelt key also makes the real one "missing": name the misspelling, it is the mistake.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = prefix + tuple(first["loc"])
    extra = ""
    if first["type"] == "extra_forbidden" and len(loc) >= 1:
        allowed = _allowed_fields(prefix, loc) if allowed is None else allowed
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if len(str(loc[-1])) <= 60 else []
        extra = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
    if first["type"] == "missing" and loc == ("stages",):
        extra = " (a stack with no stage says `stages: []`)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return StackError(f"{label}: {_field_path(loc)}: {_describe(first)}{extra}{more}")


def _allowed_fields(prefix: tuple, loc: tuple) -> list[str]:
    if len(loc) == 1:
        return list(StackSpec.model_fields)
    if len(loc) == 3 and loc[0] == "stages":
        return list(StageSpec.model_fields)
    return []


def load_stack(source: str | Path | dict | Stack, registry: Any = None) -> Stack:
    """Read and validate a stack from a YAML file path or a dict.

    Every stage's method must be registered, its ``at`` one of the method's points, its ``params``
    valid for the method's config. Raises :class:`~tokenpress.core.errors.StackError` with one sentence
    naming the file, the stage and the field. Layer indices are checked against the model when the
    stack is attached (``tokenpress.compress``).
    """
    if isinstance(source, Stack):
        return source

    registry = registry or get_registry()
    data, label = _read(source)
    try:
        spec = StackSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(label, exc) from None

    stages = []
    for index, stage_spec in enumerate(spec.stages):
        where = f"{label}: stages[{index}]"
        method_class = registry.methods.get(stage_spec.method)
        if method_class is None:
            known = sorted(registry.methods)
            close = difflib.get_close_matches(stage_spec.method, known, n=3) if len(stage_spec.method) <= 60 else []
            more = f" and {len(known) - 8} more (see tokenpress plugins)" if len(known) > 8 else ""
            shown = ", ".join(known[:8]) + more
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known: {shown}"
            raise StackError(f"{where}.method: unknown method {quote(stage_spec.method, 40)}; {hint}")
        point = stage_spec.at or method_class.default_point()
        if point not in method_class.points:
            raise StackError(
                f"{where}.at: method {stage_spec.method!r} cannot act at {point!r}; "
                f"it supports {', '.join(method_class.points)}"
            )
        layers: tuple[int, ...] = ()
        inside = point == "post_encoder" and method_class.encoder_blocks
        if point == "decoder_layer" or inside:
            if stage_spec.layers is None and method_class.has_default_layers():
                stage_spec = stage_spec.model_copy(update={"layers": []})  # resolved against the model
            elif not stage_spec.layers:
                what = "encoder block(s) it acts inside" if inside else "layer(s) it acts before"
                raise StackError(f"{where}.layers: a {point} stage of {stage_spec.method!r} must list the {what}")
            if any(layer < 0 for layer in stage_spec.layers):
                raise StackError(f"{where}.layers: layer indices start at 0 (got {quote(stage_spec.layers)})")
            if len(set(stage_spec.layers)) != len(stage_spec.layers):
                raise StackError(f"{where}.layers: a layer is listed twice (got {quote(stage_spec.layers)})")
            layers = tuple(stage_spec.layers)
        elif stage_spec.layers is not None:
            hint = ("; to act before decoder layers, add `at: decoder_layer`"
                    if stage_spec.at is None and "decoder_layer" in method_class.points else "")
            raise StackError(f"{where}.layers: only decoder_layer stages and in-encoder methods take layers (this one "
                             f"is at {point}){hint}")
        try:
            config = method_class.Config.model_validate(stage_spec.params)
        except ValidationError as exc:
            raise _spec_error(where, exc, prefix=("params",), allowed=list(method_class.Config.model_fields)) from None
        stage = Stage(index, stage_spec.method, method_class, point, layers, config)
        _check_layers_of(stage, label)
        stages.append(stage)
    stack = Stack(spec.name, spec.positions, tuple(stages), label, spec.description)
    problem = order_problem(stack)
    if problem is not None:
        raise StackError(f"{label}: {problem}")
    return stack


#: Token counts at which the order check asks a stage's promise whether it keeps every token.
_PROBE_COUNTS = (16, 144, 576)
#: A patch grid at which the order check asks a stage whether it re-grids (divisible by every window size).
_PROBE_GRID = (48, 48)


@dataclass(frozen=True)
class _Effect:
    """What a pre-LLM stage does to the tokens, as far as the stages after it are concerned."""

    regrids: bool  # maps each image's full, dense patch grid to a new dense grid (pool, pixel_unshuffle, ldp)
    keeps_all: bool  # keeps every token as it is (a ratio of 1.0)
    reads_signals: bool  # reads encoder signals, laid out like the encoder's own tokens
    needs_encoder_space: bool  # replaces the projector: takes encoder-space tokens
    gives_llm_space: bool  # returns projected tokens


def _effect(stage: Stage) -> _Effect:

    method = stage.method_class(stage.config, stage.layers)
    try:
        regrids = method.expected_grid(*_PROBE_GRID) is not None
    except (ValueError, ArithmeticError):  # a window that does not divide the probe grid still re-grids
        regrids = True
    counts = torch.tensor(_PROBE_COUNTS)
    promised = None if regrids else method.promised_count(counts)
    keeps_all = promised is not None and torch.equal(torch.as_tensor(promised).reshape(-1), counts)
    try:
        reads_signals = bool(as_requests(method.required_signals()))
    except (TypeError, ValueError):  # a malformed request is refused, with its reason, when attaching
        reads_signals = False
    replaces = stage.point == "projector" and stage.method_class.replaces_projector
    return _Effect(regrids, keeps_all, reads_signals, replaces,
                   stage.method_class.returns_llm_space(stage.point))


def _pre_llm_in_run_order(stack: Stack) -> list[Stage]:
    """The stages before the LLM in the order a prefill runs them: those inside the encoder, then each
    pre-LLM point in data-flow order, each point's stages in the order the file lists them."""
    inside = [stage for stage in stack.stages if stage.inside_encoder]
    points = [stage for point in PRE_LLM_POINTS for stage in stack.stages
              if stage.point == point and not stage.inside_encoder]
    return inside + points


def order_problem(stack: Stack) -> str | None:
    """Why the stack's stages cannot run in the order a prefill runs them (None when they can): the one
    place that decides it (``load_stack``, hence ``validate``, ``compress`` and ``flops``, asks it).

    A stage that re-grids needs every image's full patch grid, so no selection, merge or summary may run
    before it; a stage that reads encoder signals needs the encoder's tokens as they came out (signals
    are laid out like them); a stage that replaces the projector needs tokens still in encoder space.
    """
    selected: Stage | None = None  # the last stage that left rows that are no longer a full grid
    changed: Stage | None = None  # the first stage (after the encoder) that changed the tokens
    projected: Stage | None = None  # the first stage that returned tokens in LLM space
    for stage in _pre_llm_in_run_order(stack):
        effect = _effect(stage)

        def after(other: Stage, why: str, stage: Stage = stage) -> str:
            return (f"stages[{stage.index}] ({stage.method}) cannot run after stages[{other.index}] "
                    f"({other.method}): {why}")

        if effect.needs_encoder_space and projected is not None:
            return after(projected, f"{stage.method} replaces the projector and needs tokens in encoder space, "
                                    f"which {projected.method} has already projected; use one of them")
        if effect.regrids and selected is not None:
            return after(selected, f"{stage.method} re-grids each image's full patch grid, which "
                                   f"{selected.method} has already reduced; list {stage.method} first")
        if effect.reads_signals and changed is not None:
            return after(changed, f"{stage.method} reads encoder signals of the encoder's own tokens, which "
                                  f"{changed.method} has changed; list {stage.method} first")
        if not effect.keeps_all:
            if not stage.inside_encoder:
                changed = changed or stage
            if not effect.regrids:
                selected = stage
        if effect.gives_llm_space:
            projected = projected or stage
    return None


def stack_json_schema(registry: Any = None) -> dict:
    """JSON schema of stack files, with each registered method's ``params`` (for editors)."""

    registry = registry or get_registry()
    schema = StackSpec.model_json_schema()
    stage_schema = schema["$defs"]["StageSpec"]
    stage_schema["properties"]["method"]["enum"] = sorted(registry.methods)
    rules = []
    for name, method_class in sorted(registry.methods.items()):
        params = method_class.Config.model_json_schema()
        rules.append({
            "if": {"properties": {"method": {"const": name}}},
            "then": {"properties": {"params": params, "at": {"enum": list(method_class.points)}}},
        })
    stage_schema["allOf"] = rules
    schema["title"] = "tokenpress stack"
    return schema


def dump_schema(registry: Any = None) -> str:
    return json.dumps(stack_json_schema(registry), indent=2, sort_keys=True)


__all__ = ["POINTS", "Stack", "StackSpec", "Stage", "StageSpec", "load_stack", "stack_json_schema"]

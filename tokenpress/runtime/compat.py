"""Every transformers detail that moves between releases, in one place, detected by feature.

Adapters, the engine, the tooling and the tests go through these helpers; none of them compares
version strings. Each helper says which behaviour it detects and the release where it changed:

* the KV-cache argument of model and decoder-layer forwards: ``past_key_values`` up to 5.23,
  ``cache`` from 5.24 (``past_key_values`` still accepted there, with a FutureWarning, until 5.40);
  outputs carry the field of the same name (:func:`cache_argument`, :func:`output_cache`);
* the output classes of the inner multimodal modules and their fields: Qwen2.5-VL returned its own
  class with ``rope_deltas`` up to 5.22 and a plain ``BaseModelOutputWithPast`` in 5.23; from 5.24
  LLaVA and Qwen2.5-VL return ``MultimodalBaseModelOutputWithPast`` with ``image_outputs`` (an
  encoder output) where LLaVA had ``image_hidden_states`` (:func:`output_class`, :func:`build_output`);
  Qwen3-VL-MoE's forward returns another class than it declares from 5.24 (:data:`RETURNED_OUTPUTS`);
  up to 5.23 Gemma 3's and InternVL's ``image_hidden_states`` hold one row per image, stacked (I, T, D), where
  the other families concatenate them (:data:`STACKED_IMAGE_STATES`);
* ``mm_encoder_outputs``: pre-computed encoder outputs that ``generate`` passes to the forward, from
  5.19 (:func:`accepts_encoder_outputs`, :func:`encoder_output`);
* ``from_pretrained`` enables hub kernels by default from 5.25 (:data:`PRETRAINED_OPTIONS`);
* Qwen2.5-VL's M-RoPE: up to 5.18 the rotary embedding returns one (cos, sin) per axis (3, B, N, d)
  and the attention interleaves them by ``mrope_section``; from 5.19 the rotary embedding does it and
  returns (B, N, d) (:func:`interleave_mrope`).

The range of releases the suite has passed on is :data:`TESTED_TRANSFORMERS` (the same range
``pyproject.toml`` declares); :func:`check_transformers` warns once per attach outside it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from tokenpress.core.errors import UnsupportedModelError

#: The transformers releases the whole suite has passed on; ``pyproject.toml`` declares the same
#: range (checked by tests/test_packaging.py). Widen it only after the suite passed on the new end.
TESTED_TRANSFORMERS = ">=5.18.0,<5.26"

#: Names a forward has used for its KV cache, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


#: Options tokenpress passes to a model class's ``from_pretrained``. From 5.25 ``from_pretrained`` turns
#: hub kernels on by default and refuses to load without the ``kernels`` package (which 5.25.0
#: requires at a version not published on this project's registry); tokenpress loads local
#: checkpoints offline and needs no hub kernels. Every tested release takes ``use_kernels``.
PRETRAINED_OPTIONS: dict[str, Any] = {"use_kernels": False}


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the range tokenpress was tested on."""


def transformers_version() -> str:
    return transformers.__version__


def outside_tested_range(version: str | None = None) -> str | None:
    """The warning sentence when ``version`` (default: the installed one) is outside the tested range."""
    version = version or transformers_version()
    if SpecifierSet(TESTED_TRANSFORMERS).contains(Version(version), prereleases=True):
        return None
    return (f"tokenpress was tested with transformers {TESTED_TRANSFORMERS}, but transformers {version} is "
            "installed; compression may fail or be wrong (run the test suite against it with "
            f"`.ci/test-transformers {version}`)")


def check_transformers() -> None:
    """Warn (one sentence, :class:`UntestedTransformersWarning`) outside the tested range."""
    message = outside_tested_range()
    if message:
        warnings.warn(message, UntestedTransformersWarning, stacklevel=3)


# --- signatures ---------------------------------------------------------------------------------


@functools.cache
def _parameters(function: Callable[..., Any]) -> frozenset[str]:
    # inspect.signature follows __wrapped__, so transformers' deprecate_kwarg/can_return_tuple
    # decorators show the real parameters.
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()


def forward_parameters(module: torch.nn.Module) -> frozenset[str]:
    """Parameter names of the forward that ``module``'s class defines (instance overrides ignored)."""
    return _parameters(type(module).forward)


def cache_argument(module: torch.nn.Module) -> str:
    """The name under which ``module``'s forward takes the KV cache: ``cache`` (5.24+) or ``past_key_values``."""
    parameters = forward_parameters(module)
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise UnsupportedModelError(
        f"{type(module).__name__}.forward takes none of {', '.join(CACHE_ARGUMENTS)}, so tokenpress cannot pass "
        f"it the KV cache (transformers {transformers_version()}; tested: {TESTED_TRANSFORMERS})")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from forward keyword arguments, under whichever name the caller used."""
    found = None
    for name in CACHE_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def accepts_encoder_outputs(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward takes pre-computed ``mm_encoder_outputs`` (5.19+)."""
    return "mm_encoder_outputs" in forward_parameters(module)


# --- outputs ------------------------------------------------------------------------------------


def _fields(output_class: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(output_class)) if dataclasses.is_dataclass(output_class) \
        else frozenset()


@functools.cache
def _declared_output(forward: Callable[..., Any]) -> type | None:
    try:
        annotation = typing.get_type_hints(forward).get("return")
    except Exception:  # unresolvable annotations: fall back below
        return None
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput) and "last_hidden_state" in \
                _fields(candidate):
            return candidate
    return None


#: Inner modules whose forward returns another output class than it declares: class name -> the names of the
#: class it returns, the newest release's first. Qwen3-VL-MoE's forward declares
#: ``MultimodalBaseModelOutputWithPast`` from 5.24 but returns ``Qwen3VLMoeBaseModelOutputWithPast``, whose
#: ``router_logits`` its outer forward reads; up to 5.23 it declares and returns ``Qwen3VLMoeModelOutputWithPast``.
RETURNED_OUTPUTS: dict[str, tuple[str, ...]] = {
    "Qwen3VLMoeModel": ("Qwen3VLMoeBaseModelOutputWithPast", "Qwen3VLMoeModelOutputWithPast"),
}


#: Output classes whose ``image_hidden_states`` (up to 5.23, before ``image_outputs``) stack the images'
#: features (I, T, D), as those models' ``get_image_features`` returns them, instead of concatenating them.
#: tokenpress stacks its per-sample features there when they have equal shapes (Gemma 3, one image per
#: sample); InternVL stacks per tile, which tokenpress's per-sample features do not split into: it gets
#: the same values concatenated (T_total, D).
STACKED_IMAGE_STATES: frozenset[str] = frozenset({"Gemma3ModelOutputWithPast", "InternVLModelOutputWithPast"})


def output_class(module: torch.nn.Module) -> type:
    """The output class ``module``'s forward returns, for outputs that the model's own outer forward reads
    field by field: the one it declares (``-> tuple | X``), or, for a forward known to return another
    (:data:`RETURNED_OUTPUTS`), that one as its modeling file defines it; ``BaseModelOutputWithPast`` if it
    declares none."""
    defined = sys.modules.get(type(module).__module__)
    for name in RETURNED_OUTPUTS.get(type(module).__name__, ()):
        candidate = getattr(defined, name, None)
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput) and "last_hidden_state" in \
                _fields(candidate):
            return candidate
    return _declared_output(type(module).forward) or BaseModelOutputWithPast


def cache_field(output_class: type) -> str:
    """The field of an output class that holds the KV cache (``cache`` from 5.24, else ``past_key_values``)."""
    fields = _fields(output_class)
    for name in CACHE_ARGUMENTS:
        if name in fields:
            return name
    raise UnsupportedModelError(f"{output_class.__name__} has none of the fields {', '.join(CACHE_ARGUMENTS)} "
                                f"(transformers {transformers_version()}; tested: {TESTED_TRANSFORMERS})")


def encoder_output(features: Sequence[torch.Tensor]) -> Any:
    """What ``get_image_features`` returns for these per-image features (an encoder output with
    ``pooler_output``), e.g. to pass as ``mm_encoder_outputs={"image": ...}``."""

    return BaseModelOutputWithPooling(pooler_output=tuple(features))


def build_output(output_class: type, last_hidden_state: torch.Tensor, cache: Any,
                 image_features: Sequence[torch.Tensor] | None = None, **extra: Any) -> Any:
    """An instance of ``output_class`` with the fields this release defines.

    ``image_features`` (tensors to concatenate: one per image or per sample) go into
    ``image_outputs`` (5.24+) or, concatenated, into ``image_hidden_states``; ``extra`` fields
    (e.g. Qwen2.5-VL's ``rope_deltas`` up to 5.22) are set only where the class has them.
    """
    fields = _fields(output_class)
    values: dict[str, Any] = {"last_hidden_state": last_hidden_state, cache_field(output_class): cache}
    if image_features is not None:
        if "image_outputs" in fields:
            values["image_outputs"] = encoder_output(image_features)
        elif "image_hidden_states" in fields:
            values["image_hidden_states"] = _image_states(output_class, list(image_features))
    values.update({name: value for name, value in extra.items() if name in fields})
    return output_class(**values)


def _image_states(output_class: type, features: list[torch.Tensor]) -> torch.Tensor | None:
    """``image_hidden_states`` as ``output_class`` holds them: stacked per image where the model stacks them
    (:data:`STACKED_IMAGE_STATES`) and the images kept equal counts, else concatenated."""
    if not features:
        return None
    same = all(feature.shape == features[0].shape for feature in features)
    if output_class.__name__ in STACKED_IMAGE_STATES and same:
        return torch.stack(features)
    return torch.cat(features)


def output_cache(output: Any) -> Any:
    """The KV cache a model returned, read from the field this release uses (no deprecation warning)."""
    name = cache_field(type(output))
    return getattr(output, name)


# --- rotary embeddings --------------------------------------------------------------------------


def counted_flops(counter: Any) -> int:
    """What a :class:`torch.utils.flop_counter.FlopCounterMode` counted, without rotary-embedding tables.

    Up to 5.18 the rotary embeddings build their tables with a matrix product (an outer product of the
    frequencies and the positions), which the counter charges; from 5.19 they multiply elementwise,
    which it does not. tokenpress's analytical model leaves rotary embeddings out, so the modules
    whose name says ``rotary`` are subtracted here.
    """
    counts = counter.get_flop_counts()
    rotary = [name for name in counts if "rotary" in name.rsplit(".", 1)[-1].lower()]
    outermost = [name for name in rotary if not any(name.startswith(other + ".") for other in rotary)]
    return counter.get_total_flops() - sum(sum(counts[name].values()) for name in outermost)



def interleave_mrope(cos: torch.Tensor, sin: torch.Tensor, mrope_section: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE (cos, sin) as one (B, N, d) pair, whatever form the rotary embedding returned.

    Up to 5.18 Qwen2.5-VL's rotary embedding returns (3, B, N, d), one per axis (t, h, w), and the
    attention takes each chunk of ``mrope_section`` frequencies from its axis; from 5.19 the rotary
    embedding does that itself and returns (B, N, d).
    """
    if cos.dim() == 3:
        return cos, sin
    sections = list(mrope_section) * 2

    def pick(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk[i % 3] for i, chunk in enumerate(table.split(sections, dim=-1))], dim=-1)

    return pick(cos), pick(sin)


__all__ = [
    "CACHE_ARGUMENTS",
    "PRETRAINED_OPTIONS",
    "RETURNED_OUTPUTS",
    "TESTED_TRANSFORMERS",
    "UntestedTransformersWarning",
    "accepts_encoder_outputs",
    "build_output",
    "cache_argument",
    "cache_field",
    "check_transformers",
    "counted_flops",
    "encoder_output",
    "forward_parameters",
    "interleave_mrope",
    "output_cache",
    "output_class",
    "outside_tested_range",
    "pop_cache",
    "transformers_version",
]

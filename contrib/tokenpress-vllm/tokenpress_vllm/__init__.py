"""Serve vision-language models compressed by tokenpress stacks with vLLM.

```python
from vllm import LLM
import tokenpress_vllm

llm = LLM(**tokenpress_vllm.engine_args("zoo:llava-shapes", {"pool": "stacks/pool.yaml",
                                                            "none": {"name": "none", "stages": []}}),
          enforce_eager=True, dtype="float32")
llm.generate({"prompt": "<image>\\nwhat color is at 1 1 ?", "multi_modal_data": {"image": image},
              "mm_processor_kwargs": {"tokenpress_stack": "none"}})   # a request may choose another stack
```

The stacks travel in the model config (``--hf-overrides``), with the architecture of the tokenpress
model class that serves the family; ``python -m tokenpress_vllm MODEL STACK...`` prints the
``vllm serve`` command line.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenpress.core.stack import Stack, load_stack
from tokenpress.runtime.loading import load_config, resolve_model_path
from tokenpress_vllm.stacks import CONFIG_KEY, REQUEST_KEY, NotServable, ServingStacks, check_servable

__version__ = "0.1.0"

#: model_type -> the architecture name of the tokenpress model class that serves it.
ARCHITECTURES = {
    "llava": "TokenpressLlavaForConditionalGeneration",
    "llava_next": "TokenpressLlavaNextForConditionalGeneration",
    "qwen2_5_vl": "TokenpressQwen2_5_VLForConditionalGeneration",
}

StackSource = Stack | Mapping[str, Any] | str | Path


def _named(stacks: StackSource | Mapping[str, StackSource]) -> dict[str, Stack]:
    """One stack (named by its own ``name``) or a mapping of names to stacks, loaded."""
    if isinstance(stacks, Mapping) and "stages" not in stacks:
        return {str(name): load_stack(source if not isinstance(source, Path) else str(source))
                for name, source in stacks.items()}
    stack = load_stack(stacks if not isinstance(stacks, Path) else str(stacks))
    return {stack.name: stack}


def hf_overrides(model: str | Path, stacks: StackSource | Mapping[str, StackSource],
                 default: str | None = None) -> dict[str, Any]:
    """The ``hf_overrides`` (``--hf-overrides``) that serve ``model`` with ``stacks``: one stack, or a
    mapping of names to stacks a request chooses from (``mm_processor_kwargs={"tokenpress_stack": NAME}``);
    ``default`` (the first by default) serves requests that choose none. Every stack is checked against the
    model here: one vLLM cannot serve raises :class:`NotServable` with one sentence saying why."""
    folder = resolve_model_path(model)
    config = load_config(folder)
    architecture = ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise NotServable(f"{model}: tokenpress serves model_type {', '.join(ARCHITECTURES)} with vLLM, "
                          f"not {config.model_type!r}")
    named = {name: check_servable(stack, config) for name, stack in _named(stacks).items()}
    settings = {"stacks": {name: stack.as_dict() for name, stack in named.items()},
                "default": default if default is not None else next(iter(named), ""),
                "checkpoint": str(folder.resolve())}
    config_with_settings = load_config(folder)
    setattr(config_with_settings, CONFIG_KEY, settings)
    served = ServingStacks.from_config(config_with_settings)  # refuses what vLLM cannot serve, before vLLM starts
    _check_against_model(folder, served)
    return {"architectures": [architecture], CONFIG_KEY: settings}


def _stray_weights(folder: Path) -> list[Path]:
    """Safetensors files beside a single-file checkpoint that are not the model's (a zoo proxy ships its
    methods' fitted weights there): vLLM would load every ``*.safetensors`` of a folder without an index."""
    if (folder / "model.safetensors.index.json").is_file() or not (folder / "model.safetensors").is_file():
        return []
    return [path for path in folder.glob("*.safetensors") if path.name != "model.safetensors"]


def _check_against_model(folder: Path, served: ServingStacks) -> None:
    """What tokenpress checks when a stack is attached to this model (encoder signals the family gives,
    encoder blocks, hook signatures), on the model built from its config on the meta device (no weights)."""
    from tokenpress.runtime.attach import check_stack, find_adapter
    from tokenpress.runtime.loading import load_model

    adapter = find_adapter(load_model(folder, meta=True))
    for stack in served:
        resolved = stack.stack.resolved(adapter.num_layers, adapter.feature_blocks(),
                                        adapter.num_encoder_layers() or None)
        check_stack(resolved, adapter)


def serving_checkpoint(model: str | Path) -> str:
    """The folder vLLM should load ``model`` (``zoo:NAME`` or a folder) from: the folder itself, or a
    temporary copy (links to its files) where vLLM needs it to differ. The original is never written to.

    vLLM loads every ``*.safetensors`` of a folder without an index, so the copy leaves out the methods'
    weight files a zoo proxy ships beside its model (tokenpress still finds them: the vision side is
    loaded from the original folder); vLLM's Qwen2.5-VL processor needs a video processor config beside
    the checkpoint, so the copy has one written from the image processor's settings."""
    return _serving_copy(resolve_model_path(model).resolve())


@functools.cache
def _serving_copy(folder: Path) -> str:
    """:func:`serving_checkpoint` of a resolved folder, made once per process."""
    config = load_config(folder)
    stray = _stray_weights(folder)
    needs_video = config.model_type == "qwen2_5_vl" and not (folder / "video_preprocessor_config.json").is_file()
    if not stray and not needs_video:
        return str(folder)
    copy = Path(tempfile.mkdtemp(prefix=f"tokenpress-vllm-{folder.name}-"))
    for item in folder.iterdir():
        if item not in stray:
            (copy / item.name).symlink_to(item)
    if needs_video:
        image = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
        shared = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                  "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")
        video = {key: image[key] for key in shared if key in image}
        video["video_processor_type"] = "Qwen2VLVideoProcessor"
        (copy / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return str(copy)


def engine_args(model: str | Path, stacks: StackSource | Mapping[str, StackSource],
                default: str | None = None) -> dict[str, Any]:
    """``model`` and ``hf_overrides`` for ``vllm.LLM(...)`` (or ``AsyncEngineArgs``) serving ``model`` with
    ``stacks`` (see :func:`hf_overrides`)."""
    return {"model": serving_checkpoint(model), "hf_overrides": hf_overrides(model, stacks, default)}


__all__ = ["ARCHITECTURES", "CONFIG_KEY", "REQUEST_KEY", "NotServable", "check_servable", "engine_args",
           "hf_overrides", "serving_checkpoint"]

"""Loading what people hand to tokenpress: model folders (``zoo:NAME`` for a shipped proxy model),
their processors, and images - each mistake one sentence (:class:`~tokenpress.core.errors.InputError`
or :class:`~tokenpress.core.errors.UnsupportedModelError`), never a traceback.

The command line, ``tokenpress.measure.evaluate``, ``tokenpress.tools.viz`` and ``tokenpress.measure.bench`` all load
through here, so they refuse the same inputs the same way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import logging as transformers_logging

from tokenpress.core.errors import InputError, UnsupportedModelError
from tokenpress.core.flops import FlopsError
from tokenpress.runtime import compat
from tokenpress.zoo import zoo_path


def resolve_model_path(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names: ``zoo:NAME`` (a shipped proxy model) or a local folder."""
    text = str(path)
    if text.startswith("zoo:"):
        try:
            folder = zoo_path(text)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not (folder / "config.json").is_file():
            raise InputError(f"{text}: this proxy model is not in this installation (train it with "
                             f"`tokenpress zoo train {text.removeprefix('zoo:')} --out DIR`, then pass --model DIR)")
        return folder
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{text}: no such model folder")
    return folder


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def load_config(path: str | Path) -> Any:
    """The checkpoint's config, refused in one sentence unless it is an image-text-to-text model."""
    folder = resolve_model_path(path)

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a loadable model folder ({_first_line(exc)})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UnsupportedModelError(f"{path}: model_type {model_type!r} is not an image-text-to-text model "
                                    "(tokenpress compresses the images of vision-language models)")
    return config


def config_from_file(path: str | Path) -> Any:
    """A transformers config from a ``config.json`` file (or a folder holding one), without weights."""

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FlopsError(f"{path}: no such config file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlopsError(f"{file}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise FlopsError(f"{file}: not a transformers config (no model_type)")
    try:
        return AutoConfig.from_pretrained(file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"{file}: cannot build a config for model_type {data['model_type']!r} "
                                    f"({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """transformers' progress bars (its "Loading weights" bar) switched off inside the block unless
    ``shown``; their previous state is restored afterwards."""

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if shown or not was_enabled:
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def load_model(path: str | Path, meta: bool = False, progress: bool = True) -> Any:
    """An image-text-to-text model from a checkpoint folder with plain ``from_pretrained``, in eval
    mode (``meta=True``: built from its config on the meta device, no weights read; ``progress=False``:
    without transformers' weight-loading bar, for ``--quiet``)."""
    config = load_config(path)

    try:
        if meta:
            with torch.device("meta"):
                return AutoModelForImageTextToText.from_config(config)
        with _progress_bars(progress):
            return AutoModelForImageTextToText.from_pretrained(resolve_model_path(path),
                                                               **compat.PRETRAINED_OPTIONS).eval()
    except ValueError as exc:
        raise UnsupportedModelError(f"{path}: cannot load model_type {config.model_type!r} as an "
                                    f"image-text-to-text model ({_first_line(exc)})") from None
    except OSError as exc:  # missing or unreadable weights
        raise InputError(f"{path}: cannot read the model's weights ({_first_line(exc)})") from None


def load_processor(path: str | Path) -> Any:
    """The checkpoint's processor, padding on the left (as batched generation wants)."""
    load_config(path)

    try:
        processor = AutoProcessor.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise InputError(f"{path}: cannot load the model's processor ({_first_line(exc)})") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise UnsupportedModelError(f"{path}: its processor ({type(processor).__name__}) has no tokenizer; an "
                                    "image-text-to-text processor is needed")
    tokenizer.padding_side = "left"
    return processor


def load_model_and_processor(path: str | Path, progress: bool = True) -> tuple[Any, Any]:
    """``zoo:NAME`` or a checkpoint folder, loaded offline: the model (eval mode) and its processor
    (``progress=False``: no weight-loading bar)."""
    return load_model(path, progress=progress), load_processor(path)


def open_image(path: str | Path) -> Any:
    """The picture at ``path`` as an RGB PIL image, fully decoded (so a truncated file fails here)."""

    file = Path(path)
    if file.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    if not file.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(file) as picture:
            return picture.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({_first_line(exc)})") from None


def chat_prompt(processor: Any, text: str) -> str:
    """``text`` about one image in the model's chat format when it has one, else ``<image>\\n{text}``."""
    image_token = getattr(processor, "image_token", "<image>")
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{image_token}\n{text}"


def process(processor: Any, images: list[Any], text: list[str] | str, what: str = "the image", **kwargs: Any) -> Any:
    """``processor(images=..., text=..., return_tensors="pt")``, with a processor's refusal (for
    example Qwen2.5-VL's limit on aspect ratios) said in one sentence that names ``what``."""
    try:
        return processor(images=images, text=text, return_tensors="pt", **kwargs)
    except ValueError as exc:
        raise InputError(f"{what}: the model's processor refuses it ({_first_line(exc)})") from None


__all__ = ["chat_prompt", "config_from_file", "load_config", "load_model", "load_model_and_processor",
           "load_processor", "open_image", "process", "resolve_model_path"]

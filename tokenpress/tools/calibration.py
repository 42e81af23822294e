"""``tokenpress calibrate``: the data a method with a calibration step learns from, and the command's core.

A method that can be calibrated (its class overrides :meth:`~tokenpress.Method.calibrate`) receives
the model, its stage of the stack, training batches and held-out batches, and returns a
:class:`Calibration` that reports what it learnt and writes it to a file its ``params`` can name.
The core knows no method by name: it only supplies data.

Data: for the shipped proxies (``zoo:NAME``) the shapes benchmark's train split (held out: the val
split); for a user's model a folder of images with prompts, either ``prompts.jsonl`` (one
``{"image": "a.png", "prompt": "..."}`` per line) or image files each with a ``.txt`` of the same
stem. Every eighth folder sample is held out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tokenpress.core.errors import InputError
from tokenpress.data import shapes
from tokenpress.runtime.loading import chat_prompt, open_image, process

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
HELD_OUT_EVERY = 8
ZOO_HELD_OUT = 64


class Calibration(Protocol):
    """What a method's calibration returns."""

    def table(self) -> str:
        """A markdown table of what calibration changed (on held-out data)."""

    def save(self, path: str | Path) -> Path:
        """Write the calibrated state where the method's ``params`` can name it."""


@dataclass(frozen=True)
class PromptedImage:
    """One calibration sample: an image file (or a PIL image) and the prompt asked about it."""

    image: Any
    prompt: str


def folder_samples(folder: str | Path) -> list[PromptedImage]:
    """The images and prompts of a calibration folder (``prompts.jsonl``, or ``NAME.png`` + ``NAME.txt``)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--data {folder}: not a folder (expected images with prompts: prompts.jsonl, or "
                         f"NAME.png beside NAME.txt)")
    listing = root / "prompts.jsonl"
    samples: list[PromptedImage] = []
    if listing.is_file():
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image, prompt = root / entry["image"], str(entry["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{listing}:{number}: expected {{\"image\": FILE, \"prompt\": TEXT}}") from None
            if not image.is_file():
                raise InputError(f"{listing}:{number}: no image {image}")
            samples.append(PromptedImage(image, prompt))
    else:
        for image in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            text = image.with_suffix(".txt")
            if text.is_file():
                samples.append(PromptedImage(image, text.read_text(encoding="utf-8").strip()))
    if len(samples) < 2:
        raise InputError(f"--data {folder}: found {len(samples)} image(s) with a prompt; calibration needs at "
                         f"least 2 (prompts.jsonl, or NAME.png beside NAME.txt)")
    return samples


def zoo_samples(split: str, count: int, seed: int) -> list[PromptedImage]:
    """The first ``count`` questions of a split of the shapes benchmark."""

    available = shapes.SPLIT_SIZES[split]
    if count > available:
        raise InputError(f"--samples {count}: the shapes {split} split has {available} questions")
    made = (shapes.make_sample(split, index, seed) for index in range(count))
    return [PromptedImage(sample.image, sample.question) for sample in made]


def split_samples(model: str, data: str | None, samples: int, seed: int
                  ) -> tuple[list[PromptedImage], list[PromptedImage]]:
    """(train, held out) for ``--model``/``--data``: the shapes splits for a zoo model, else the folder."""
    if data is None:
        if not str(model).startswith("zoo:"):
            raise InputError(f"--model {model}: give --data FOLDER (images with prompts) to calibrate a model "
                             f"that is not a shipped proxy")
        return zoo_samples("train", samples, seed), zoo_samples("val", ZOO_HELD_OUT, seed)
    every = folder_samples(data)
    held_out = every[HELD_OUT_EVERY - 1::HELD_OUT_EVERY] or every[-1:]
    train = [sample for sample in every if sample not in held_out][:samples]
    return train, held_out


def batches(processor: Any, samples: list[PromptedImage], batch_size: int, chat: bool
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Processed, padded model inputs for ``samples``, ``batch_size`` at a time (images opened lazily).

    ``chat``: prompts in the model's chat format (a user's model); else as ``tokenpress eval`` asks
    the shapes questions (the proxies), so calibration sees what evaluation sees.
    """
    image_token = getattr(processor, "image_token", shapes.IMAGE_TOKEN)
    def form(text: str) -> str:
        return chat_prompt(processor, text) if chat else shapes.build_prompt(text, image_token)

    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = [open_image(s.image) if isinstance(s.image, (str, Path)) else s.image for s in chunk]
        prompts = [form(s.prompt) for s in chunk]
        yield dict(process(processor, images, prompts, what=f"calibration samples {start}-{start + len(chunk) - 1}",
                           padding=True))


__all__ = ["Calibration", "PromptedImage", "batches", "folder_samples", "split_samples", "zoo_samples"]

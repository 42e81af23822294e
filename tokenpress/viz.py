"""``tokenpress viz``: a PNG showing, over the image, which patches each stage (and each decoder
layer with a stage) still represents. Dropped patches are dimmed; the panel title gives the count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from tokenpress.attach import compress
from tokenpress.stack import Stack, load_stack

PANEL = 192
TITLE = 18


def model_view(pixel_values: torch.Tensor, image_processor: Any) -> Image.Image:
    """The image exactly as the encoder saw it (normalisation undone), so patches line up."""
    mean = np.array(getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    std = np.array(getattr(image_processor, "image_std", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    array = pixel_values.detach().float().cpu().numpy() * std + mean
    array = (np.clip(array, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(array)


def overlay(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """``image`` with the patches not in ``kept`` (h * w bool, raster order) dimmed to 25%."""
    rows, cols = grid
    mask = kept.reshape(rows, cols).float().cpu().numpy()
    mask = np.kron(mask, np.ones((image.height // rows + 1, image.width // cols + 1)))[: image.height, : image.width]
    array = np.asarray(image).astype(np.float32)
    shade = 0.25 + 0.75 * mask[..., None]
    return Image.fromarray((array * shade).astype(np.uint8))


def render_panels(view: Image.Image, trace: list[tuple[str, torch.Tensor]], grid: tuple[int, int]) -> Image.Image:
    """One panel per traced step, side by side, each titled with its label and patch count."""
    total = grid[0] * grid[1]
    canvas = Image.new("RGB", (PANEL * len(trace), PANEL + TITLE), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (label, kept) in enumerate(trace):
        panel = overlay(view, kept, grid).resize((PANEL, PANEL), Image.NEAREST)
        canvas.paste(panel, (column * PANEL, TITLE))
        draw.text((column * PANEL + 3, 3), f"{label}: {int(kept.sum())}/{total}", fill="black")
    return canvas


def visualize(stack: Stack | str | Path, image: str | Path, output: str | Path, model: str = "zoo:llava-shapes",
              prompt: str = "describe", loaded: tuple[Any, Any] | None = None) -> Path:
    """Run one prefill of ``stack`` on ``image`` and write the patch-coverage panels to ``output``."""
    from tokenpress.cli import build_prompt
    from tokenpress.evaluate import load_model_and_processor

    stack = load_stack(stack)
    model_obj, processor = loaded or load_model_and_processor(model)
    picture = Image.open(image).convert("RGB")
    inputs = processor(images=picture, text=build_prompt(processor, prompt), return_tensors="pt")
    trace: list[tuple[str, torch.Tensor]] = []
    grid = None
    with torch.no_grad(), compress(model_obj, stack) as handle:
        handle.trace = trace
        model_obj(**inputs)
        grid = handle.trace_grids
    if not trace:  # an empty stack: the encoder's full grid
        side = int(round((inputs["input_ids"] == model_obj.config.image_token_id).sum().item() ** 0.5))
        trace, grid = [("encoder", torch.ones(1, side * side, dtype=torch.bool))], torch.tensor([[1, side, side]])
    t, h, w = (int(v) for v in grid[0])
    view = model_view(inputs["pixel_values"][0], processor.image_processor)
    canvas = render_panels(view, [(label, kept[0][: t * h * w][: h * w]) for label, kept in trace], (h, w))
    output = Path(output)
    canvas.save(output, format="PNG")
    return output

"""``tokenpress viz``: a PNG showing, over the image, which patches each stage (and each decoder
layer with a stage) still represents. Dropped patches are dimmed, the patches of one merged token
are outlined together, and each panel's title gives its tokens and the patches they cover."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from tokenpress.attach import compress, find_adapter
from tokenpress.errors import InputError
from tokenpress.loading import chat_prompt, load_model, load_processor, open_image, process
from tokenpress.stack import Stack, load_stack

PANEL = 192
TITLE = 30  # two lines: the step, then its tokens and patches
MERGE_COLOUR = (255, 120, 0)


def model_view(pixel_values: torch.Tensor, image_processor: Any) -> Image.Image:
    """The image exactly as the encoder saw it (normalisation undone), so patches line up."""
    mean = np.array(getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    std = np.array(getattr(image_processor, "image_std", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    array = pixel_values.detach().float().cpu().numpy() * std + mean
    array = (np.clip(array, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(array)


def overlay(image: Image.Image, owner: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """``image`` with the patches whose ``owner`` is -1 (h * w, raster order) dimmed to 25%."""
    rows, cols = grid
    mask = (owner >= 0).reshape(rows, cols).float().cpu().numpy()
    mask = np.kron(mask, np.ones((image.height // rows + 1, image.width // cols + 1)))[: image.height, : image.width]
    array = np.asarray(image).astype(np.float32)
    shade = 0.25 + 0.75 * mask[..., None]
    return Image.fromarray((array * shade).astype(np.uint8))


def merge_edges(owner: torch.Tensor, grid: tuple[int, int]) -> list[tuple[int, int, str]]:
    """Edges ``(row, col, side)`` ("right" or "down" of a patch) that separate a merged token's
    patches from other patches, so a token standing for several patches is drawn as one outlined region."""
    rows, cols = grid
    cells = owner.reshape(rows, cols).tolist()
    members = Counter(v for row in cells for v in row if v >= 0)
    merged = {token for token, count in members.items() if count > 1}
    edges = []
    for r in range(rows):
        for c in range(cols):
            here = cells[r][c]
            for side, (rr, cc) in (("right", (r, c + 1)), ("down", (r + 1, c))):
                if rr < rows and cc < cols:
                    there = cells[rr][cc]
                    if here != there and (here in merged or there in merged):
                        edges.append((r, c, side))
    return edges


def render_panels(view: Image.Image, trace: list[tuple[str, torch.Tensor]], grid: tuple[int, int]) -> Image.Image:
    """One panel per traced step, side by side, titled with its label, tokens and patches covered.

    Dropped patches are dimmed; the patches a merged token stands for are outlined together.
    """
    rows, cols = grid
    total = rows * cols
    canvas = Image.new("RGB", (PANEL * len(trace), PANEL + TITLE), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (label, owner) in enumerate(trace):
        left = column * PANEL
        panel = overlay(view, owner, grid).resize((PANEL, PANEL), Image.NEAREST)
        canvas.paste(panel, (left, TITLE))
        for r, c, side in merge_edges(owner, grid):
            if side == "right":
                x = left + (c + 1) * PANEL // cols
                draw.line([(x, TITLE + r * PANEL // rows), (x, TITLE + (r + 1) * PANEL // rows)], fill=MERGE_COLOUR)
            else:
                y = TITLE + (r + 1) * PANEL // rows
                draw.line([(left + c * PANEL // cols, y), (left + (c + 1) * PANEL // cols, y)], fill=MERGE_COLOUR)
        tokens = len(torch.unique(owner[owner >= 0]))
        draw.text((left + 3, 2), label, fill="black")
        draw.text((left + 3, 15), f"{tokens} tokens, {int((owner >= 0).sum())}/{total} patches", fill="black")
    return canvas


def visualize(stack: Stack | str | Path, image: str | Path, output: str | Path, model: str = "zoo:llava-shapes",
              prompt: str = "describe", loaded: tuple[Any, Any] | None = None) -> Path:
    """Run one prefill of ``stack`` on ``image`` and write the patch-coverage panels to ``output``.

    Panels show the first image's first token row (LLaVA-NeXT: its base tile), drawn over the pixels
    the encoder saw (the processor's resizing kept, its normalisation undone).
    """
    from tokenpress.engine import MEDIA_KEYS

    stack = load_stack(stack)
    picture = open_image(image)
    processor = loaded[1] if loaded else load_processor(model)  # a refused image is said before the model loads
    inputs = process(processor, [picture], [chat_prompt(processor, prompt)], what=str(image))
    model_obj = loaded[0] if loaded else load_model(model)
    adapter = find_adapter(model_obj)
    trace: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad(), compress(model_obj, stack) as handle:
        handle.trace = trace
        model_obj(**inputs)
        grid = handle.trace_grids
        if not trace:  # an empty stack: the encoder's full grid, one token per patch
            tokens, _ = adapter.encode_images({key: inputs[key] for key in MEDIA_KEYS if key in inputs}, {})
            grid = tokens.original_grid
            trace = [("encoder", torch.arange(tokens.num_slots).unsqueeze(0))]
    t, h, w = (int(v) for v in grid[0])
    view = model_view(adapter.encoder_pixels(inputs, 0), processor.image_processor)
    canvas = render_panels(view, [(label, owner[0][: t * h * w][: h * w]) for label, owner in trace], (h, w))
    output = Path(output)
    try:
        canvas.save(output, format="PNG")
    except OSError as exc:
        raise InputError(f"{output}: cannot write the picture ({exc.strerror or exc})") from None
    return output

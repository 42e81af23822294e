"""``tokenpress viz``: a PNG showing, over the image, which patches each stage (and each decoder
layer with a stage) still represents. Dropped patches are dimmed, the patches of one merged token
are outlined together, and each panel's title gives its tokens and the patches they cover.

Patches map to pixels exactly: patch ``(r, c)`` of a ``rows x cols`` grid over a picture ``H x W``
covers rows ``[round(r * H / rows), round((r + 1) * H / rows))`` and the same for columns
(:func:`cell_boundaries`): the encoder's own patches when the picture is ``rows * patch`` pixels high,
and cells that still tile the whole picture when it is not. A panel keeps the picture's proportions
and draws each patch, its dimming and its outline in the same cell.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from tokenpress.core.errors import InputError
from tokenpress.core.stack import Stack, load_stack
from tokenpress.runtime.adapter import ModelAdapter
from tokenpress.runtime.attach import compress, find_adapter
from tokenpress.runtime.interception import MEDIA_KEYS
from tokenpress.runtime.loading import chat_prompt, load_model, load_processor, open_image, process

PANEL = 192  # a panel's longer side, and the width of the column each panel (and its title) has
TITLE = 30  # two lines: the step, then its tokens and patches
MERGE_COLOUR = (255, 120, 0)
DIMMED = 0.25  # what a dropped patch keeps of its brightness

#: One traced prefill: each step's label and its patch owners (images x patches, -1: dropped).
Trace = list[tuple[str, torch.Tensor]]


def model_view(pixel_values: torch.Tensor, image_processor: Any) -> Image.Image:
    """The image exactly as the encoder saw it (normalisation undone), so patches line up.
    ``image_processor`` gives ``image_mean`` and ``image_std`` (0.5 for what it lacks, ``None`` included)."""
    mean = np.array(getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    std = np.array(getattr(image_processor, "image_std", [0.5, 0.5, 0.5])).reshape(3, 1, 1)
    array = pixel_values.detach().float().cpu().numpy() * std + mean
    array = (np.clip(array, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(array)


def cell_boundaries(length: int, cells: int) -> list[int]:
    """The ``cells + 1`` pixel boundaries that cut ``length`` pixels into ``cells`` cells: ``round(i * length /
    cells)``, halves rounded up, in integers. Cell ``i`` is ``[bounds[i], bounds[i + 1])``: the cells tile all
    ``length`` pixels with no drift, each exactly ``length / cells`` pixels when that divides."""
    return [(2 * index * length + cells) // (2 * cells) for index in range(cells + 1)]


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the panel that shows a picture of this size: its longer side :data:`PANEL` pixels,
    the other one rounded to keep the picture's proportions (a 2:1 picture gives a 2:1 panel)."""
    longer = max(height, width)

    def scaled(side: int) -> int:
        return max(1, (2 * side * PANEL + longer) // (2 * longer))

    return scaled(height), scaled(width)


def _sources(view_bounds: list[int], panel_bounds: list[int]) -> np.ndarray:
    """Along one axis, the view pixel each panel pixel shows: in each cell, the nearest pixel of the same
    patch, so that no pixel of a patch is drawn in its neighbour's cell."""
    parts = []
    for cell in range(len(view_bounds) - 1):
        patch_start, patch_length = view_bounds[cell], view_bounds[cell + 1] - view_bounds[cell]
        span = panel_bounds[cell + 1] - panel_bounds[cell]
        if span:
            offsets = np.arange(span)
            parts.append(patch_start + (2 * offsets + 1) * patch_length // (2 * span))
    return np.concatenate(parts)


def scale_to_cells(view: Image.Image, grid: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """``view`` drawn at ``size`` (height, width), patch by patch: cell ``(r, c)`` of the result (its
    :func:`cell_boundaries`) shows exactly the pixels of patch ``(r, c)`` of ``view``, nearest first."""
    rows, cols = grid
    height, width = size
    if view.height < rows or view.width < cols:
        raise ValueError(f"a {view.width}x{view.height} picture has fewer pixels than its {cols}x{rows} patches")
    source_rows = _sources(cell_boundaries(view.height, rows), cell_boundaries(height, rows))
    source_cols = _sources(cell_boundaries(view.width, cols), cell_boundaries(width, cols))
    array = np.asarray(view.convert("RGB"))
    return Image.fromarray(np.ascontiguousarray(array[source_rows][:, source_cols]))


def kept_pixels(owner: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(height, width) booleans over a picture of ``size``: True on the pixels of the patches a token still
    stands for (``owner`` >= 0, h * w in raster order), each patch on its :func:`cell_boundaries`."""
    rows, cols = grid
    height, width = size
    kept = (owner >= 0).reshape(rows, cols).cpu().numpy()
    kept = np.repeat(kept, np.diff(cell_boundaries(height, rows)), axis=0)
    return np.repeat(kept, np.diff(cell_boundaries(width, cols)), axis=1)


def overlay(image: Image.Image, owner: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """``image`` with exactly the pixels of the patches whose ``owner`` is -1 (h * w, raster order) dimmed
    to :data:`DIMMED` of their brightness; every other pixel unchanged."""
    array = np.asarray(image.convert("RGB")).astype(np.float32)
    shade = np.where(kept_pixels(owner, grid, (image.height, image.width)), 1.0, DIMMED).astype(np.float32)
    return Image.fromarray((array * shade[..., None]).astype(np.uint8))


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


def outline_merges(image: Image.Image, owner: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """``image`` with the :func:`merge_edges` drawn on the patches' :func:`cell_boundaries`: the edge right of
    patch ``(r, c)`` on the first pixel column of patch ``(r, c + 1)``, from its first row to the first row
    below it (the edge below a patch likewise), so that the segments of one region join at its corners."""
    rows, cols = grid
    ys, xs = cell_boundaries(image.height, rows), cell_boundaries(image.width, cols)
    outlined = image.copy()
    draw = ImageDraw.Draw(outlined)
    for r, c, side in merge_edges(owner, grid):
        if side == "right":
            draw.line([(xs[c + 1], ys[r]), (xs[c + 1], ys[r + 1])], fill=MERGE_COLOUR)
        else:
            draw.line([(xs[c], ys[r + 1]), (xs[c + 1], ys[r + 1])], fill=MERGE_COLOUR)
    return outlined


def draw_panel(view: Image.Image, owner: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """One step's panel at ``size`` (height, width): the view's patches in their cells, the dropped ones
    dimmed and the merged ones outlined, all three on the same cell boundaries."""
    return outline_merges(overlay(scale_to_cells(view, grid, size), owner, grid), owner, grid)


def render_panels(view: Image.Image, trace: Trace, grid: tuple[int, int],
                  shown_size: tuple[int, int] | None = None) -> Image.Image:
    """One panel per traced step, side by side, titled with its label, tokens and patches covered.

    Dropped patches are dimmed; the patches a merged token stands for are outlined together. Each panel
    has the proportions of ``shown_size`` (height, width; default: the view's own), see :func:`panel_size`,
    and starts a column :data:`PANEL` pixels wide (room for its title).
    """
    rows, cols = grid
    total = rows * cols
    size = panel_size(*(shown_size or (view.height, view.width)))
    canvas = Image.new("RGB", (PANEL * len(trace), size[0] + TITLE), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (label, owner) in enumerate(trace):
        left = column * PANEL
        canvas.paste(draw_panel(view, owner, grid, size), (left, TITLE))
        tokens = len(torch.unique(owner[owner >= 0]))
        draw.text((left + 3, 2), label, fill="black")
        draw.text((left + 3, 15), f"{tokens} tokens, {int((owner >= 0).sum())}/{total} patches", fill="black")
    return canvas


def trace_prefill(model: torch.nn.Module, inputs: dict[str, Any], stack: Stack | str | Path | dict
                  ) -> tuple[Trace, torch.Tensor]:
    """Run one prefill of ``stack`` on ``inputs``, traced: each step's patch owners, and every image's
    (t, h, w) patch grid. An empty stack traces the encoder alone (one token per patch)."""
    adapter = find_adapter(model)
    trace: Trace = []
    with torch.no_grad(), compress(model, stack) as handle:
        handle.trace = trace
        model(**inputs)
        grids = handle.trace_grids
        if not trace:
            tokens, _ = adapter.encode_images({key: inputs[key] for key in MEDIA_KEYS if key in inputs}, {})
            grids = tokens.original_grid
            trace = [("encoder", torch.arange(tokens.num_slots).expand(tokens.num_images, -1))]
    return trace, grids


def coverage_canvas(adapter: ModelAdapter, inputs: dict[str, Any], trace: Trace, grids: torch.Tensor,
                    image_processor: Any = None) -> Image.Image:
    """The panels of ``trace`` for the first image's first token row (LLaVA-NeXT: its base tile), drawn
    over the pixels the encoder saw and shown at the proportions :meth:`ModelAdapter.view_size` gives."""
    frames, rows, cols = (int(v) for v in grids[0])
    view = model_view(adapter.encoder_pixels(inputs, 0), image_processor)
    steps = [(label, owner[0][: frames * rows * cols][: rows * cols]) for label, owner in trace]
    return render_panels(view, steps, (rows, cols), adapter.view_size(inputs, 0))


def visualize(stack: Stack | str | Path, image: str | Path, output: str | Path, model: str = "zoo:llava-shapes",
              prompt: str = "describe", loaded: tuple[Any, Any] | None = None) -> Path:
    """Run one prefill of ``stack`` on ``image`` and write the patch-coverage panels to ``output``.

    Panels show the first image's first token row (LLaVA-NeXT: its base tile), drawn over the pixels
    the encoder saw (the processor's resizing kept, its normalisation undone).
    """
    stack = load_stack(stack)
    picture = open_image(image)
    processor = loaded[1] if loaded else load_processor(model)  # a refused image is said before the model loads
    inputs = process(processor, [picture], [chat_prompt(processor, prompt)], what=str(image))
    model_obj = loaded[0] if loaded else load_model(model)
    trace, grids = trace_prefill(model_obj, inputs, stack)
    canvas = coverage_canvas(find_adapter(model_obj), inputs, trace, grids, processor.image_processor)
    output = Path(output)
    try:
        canvas.save(output, format="PNG")
    except OSError as exc:
        raise InputError(f"{output}: cannot write the picture ({exc.strerror or exc})") from None
    return output

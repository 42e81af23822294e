"""``tokenpress viz`` dims exactly the pixels of the dropped patches, outlines merged tokens on the same patch
boundaries, and keeps the picture's proportions: pixel by pixel on synthetic pictures, then through a tiny
model of every registered family and through the shipped zoo models.

Every expectation here is computed independently of ``tokenpress.tools.viz``: patch ``(r, c)`` of a ``rows x cols``
grid over ``H x W`` pixels covers rows ``[round(r * H / rows), round((r + 1) * H / rows))`` (halves rounded up)
and the same for columns, a dropped pixel keeps a quarter of its value (``v // 4``), and a panel's longer side
is ``PANEL`` pixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tokenpress  # noqa: E402
from tokenpress.runtime.loading import chat_prompt, load_model, load_processor, process  # noqa: E402
from tokenpress.testing.contract import tiny_model  # noqa: E402
from tokenpress.testing.families import FAMILIES, prompts  # noqa: E402
from tokenpress.tools.viz import (  # noqa: E402
    MERGE_COLOUR,
    PANEL,
    TITLE,
    cell_boundaries,
    coverage_canvas,
    model_view,
    overlay,
    render_panels,
    trace_prefill,
    visualize,
)
from tokenpress.zoo import ZOO_NAMES  # noqa: E402

WHITE = (255, 255, 255)


def bounds(length: int, cells: int) -> list[int]:
    """Cell boundaries, exactly: round(i * length / cells), halves up."""
    return [math.floor(Fraction(index * length, cells) + Fraction(1, 2)) for index in range(cells + 1)]


def expected_panel_size(height: int, width: int) -> tuple[int, int]:
    longer = max(height, width)
    return tuple(math.floor(Fraction(side * PANEL, longer) + Fraction(1, 2)) for side in (height, width))


def spread(per_patch: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (rows, cols) array of patch values spread over a height x width picture, patch by patch."""
    rows, cols = per_patch.shape
    out = np.empty((height, width), dtype=per_patch.dtype)
    ys, xs = bounds(height, rows), bounds(width, cols)
    for r in range(rows):
        for c in range(cols):
            out[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = per_patch[r, c]
    return out


def patch_picture(height: int, width: int, grid: tuple[int, int]) -> Image.Image:
    """A picture whose red and green channels name each pixel's patch (40 + 15 * row, 40 + 15 * column) and
    whose blue channel varies inside a patch; no channel is below 40, so a dimmed pixel always changes."""
    rows, cols = grid
    patch_rows = spread(np.arange(rows)[:, None].repeat(cols, 1), height, width)
    patch_cols = spread(np.arange(cols)[None, :].repeat(rows, 0), height, width)
    y, x = np.mgrid[:height, :width]
    array = np.stack([40 + 15 * patch_rows, 40 + 15 * patch_cols, 60 + (7 * y + 3 * x) % 150], -1)
    return Image.fromarray(array.astype(np.uint8))


def patches_shown(panel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The view patch (row, column) each panel pixel of a :func:`patch_picture` comes from."""
    return (panel[..., 0].astype(int) - 40) // 15, (panel[..., 1].astype(int) - 40) // 15


def dimmed(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``array`` with the pixels under ``mask`` at a quarter of their value."""
    return np.where(mask[..., None], array // 4, array)


def panels(canvas: Image.Image | np.ndarray, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    array = np.asarray(canvas)
    height, width = size
    return [array[TITLE:TITLE + height, column * PANEL:column * PANEL + width] for column in range(count)]


def owners_dropping(grid: tuple[int, int], dropped: list[tuple[int, int]]) -> torch.Tensor:
    rows, cols = grid
    owner = torch.arange(rows * cols).reshape(rows, cols)
    for r, c in dropped:
        owner[r, c] = -1
    return owner.flatten()


USER_DROPS = [(r, 5) for r in range(12)] + [(r, 11) for r in range(12)] + [(11, c) for c in range(12)]


def test_cell_boundaries_tile_the_picture_without_drift() -> None:
    assert cell_boundaries(96, 12) == list(range(0, 97, 8))  # 8-pixel patches: exactly theirs
    assert cell_boundaries(10, 4) == [0, 3, 5, 8, 10]  # 2.5 and 7.5 round up
    for length, cells in [(70, 12), (192, 7), (100, 9), (13, 13), (1000, 36)]:
        assert cell_boundaries(length, cells) == bounds(length, cells)


def test_the_users_example_dims_pixels_40_to_47_and_the_last_column_and_row() -> None:
    """Dropping patch columns 5 and 11 and the last row of a 12x12 grid on 96x96 pixels."""
    picture = patch_picture(96, 96, (12, 12))
    out = np.asarray(overlay(picture, owners_dropping((12, 12), USER_DROPS), (12, 12)))
    changed = (out != np.asarray(picture)).any(-1)
    assert np.flatnonzero(changed[0]).tolist() == list(range(40, 48)) + list(range(88, 96))
    assert np.flatnonzero(changed[:, 0]).tolist() == list(range(88, 96))


@pytest.mark.parametrize(("height", "width", "grid"), [(96, 96, (12, 12)), (70, 100, (12, 12)), (64, 48, (5, 7))])
def test_overlay_dims_exactly_the_dropped_patches(height: int, width: int, grid: tuple[int, int]) -> None:
    """Every pixel of a dropped patch at a quarter, every other pixel unchanged (also where the picture is
    not a multiple of the grid)."""
    rows, cols = grid
    drops = [(r, 5) for r in range(rows)] + [(r, cols - 1) for r in range(rows)] + [(rows - 1, c) for c in range(cols)]
    picture = patch_picture(height, width, grid)
    owner = owners_dropping(grid, drops)
    mask = spread((owner < 0).reshape(rows, cols).numpy(), height, width)
    assert np.array_equal(np.asarray(overlay(picture, owner, grid)), dimmed(np.asarray(picture), mask))


@pytest.mark.parametrize(("height", "width", "grid"), [(96, 96, (12, 12)), (70, 70, (7, 7)), (70, 100, (12, 12))])
def test_a_panel_shows_each_patch_in_its_cell_and_dims_exactly_the_dropped_ones(
        height: int, width: int, grid: tuple[int, int]) -> None:
    rows, cols = grid
    picture = patch_picture(height, width, grid)
    owner = owners_dropping(grid, USER_DROPS if grid == (12, 12) else [(3, 3), (0, 6), (6, 0), (6, 6)])
    canvas = render_panels(picture, [("all", torch.arange(rows * cols)), ("dropped", owner)], grid)
    size = expected_panel_size(height, width)
    assert canvas.size == (2 * PANEL, TITLE + size[0])
    full, dropped = panels(canvas, 2, size)
    shown_rows, shown_cols = patches_shown(full)
    assert np.array_equal(shown_rows, spread(np.arange(rows)[:, None].repeat(cols, 1), *size))
    assert np.array_equal(shown_cols, spread(np.arange(cols)[None, :].repeat(rows, 0), *size))
    assert np.array_equal(dropped, dimmed(full, spread((owner < 0).reshape(rows, cols).numpy(), *size)))


def test_merge_outlines_sit_on_the_dimmed_cells_boundaries() -> None:
    """On a 7x7 grid (27.4-pixel cells in the panel): two merged 2x2 blocks, one in the corner by the last
    row and column, and a dropped patch under the first block. The outline between two patches is drawn
    on the first pixel column (row) of the right (lower) one, from the corner to the corner; nothing
    spills out of the panel."""
    grid = (7, 7)
    owner = torch.arange(49).reshape(7, 7)
    owner[0:2, 0:2] = 0
    owner[5:7, 5:7] = 40
    owner[2, 0] = -1
    owner = owner.flatten()
    picture = patch_picture(70, 70, grid)
    canvas = render_panels(picture, [("all", torch.arange(49)), ("merged", owner), ("all", torch.arange(49))], grid)
    first, merged, last = panels(canvas, 3, (PANEL, PANEL))
    ys = xs = bounds(PANEL, 7)
    expected = dimmed(first, spread((owner < 0).reshape(7, 7).numpy(), PANEL, PANEL)).copy()
    expected[0:ys[2] + 1, xs[2]] = MERGE_COLOUR  # right of the first block
    expected[ys[2], 0:xs[2] + 1] = MERGE_COLOUR  # below it: the dropped patch's first row
    expected[ys[5]:, xs[5]] = MERGE_COLOUR  # left of the corner block, to the panel's edge
    expected[ys[5], xs[5]:] = MERGE_COLOUR  # above it
    assert np.array_equal(merged, expected)
    assert not (first == MERGE_COLOUR).all(-1).any() and not (last == MERGE_COLOUR).all(-1).any()


@pytest.mark.parametrize(("view", "grid", "shown"), [
    ((48, 96), (6, 12), None),  # a 2:1 picture
    ((96, 48), (12, 6), None),  # a 1:2 picture
    ((32, 32), (4, 4), (32, 64)),  # a square tile that shows a 2:1 image (LLaVA-NeXT's base tile)
])
def test_panels_keep_the_pictures_proportions(view: tuple[int, int], grid: tuple[int, int],
                                              shown: tuple[int, int] | None) -> None:
    rows, cols = grid
    picture = patch_picture(*view, grid)
    owner = owners_dropping(grid, [(rows - 1, cols - 1)])
    canvas = render_panels(picture, [("all", torch.arange(rows * cols)), ("dropped", owner)], grid, shown)
    size = expected_panel_size(*(shown or view))
    assert size[0] * (shown or view)[1] == size[1] * (shown or view)[0]  # exactly the proportions here
    assert canvas.size == (2 * PANEL, TITLE + size[0])
    full, dropped = panels(canvas, 2, size)
    shown_rows, shown_cols = patches_shown(full)
    assert np.array_equal(shown_rows, spread(np.arange(rows)[:, None].repeat(cols, 1), *size))
    assert np.array_equal(shown_cols, spread(np.arange(cols)[None, :].repeat(rows, 0), *size))
    assert np.array_equal(dropped, dimmed(full, spread((owner < 0).reshape(rows, cols).numpy(), *size)))
    array = np.asarray(canvas)
    for column in range(2):  # beside a narrow panel, its column stays white
        assert (array[TITLE:, column * PANEL + size[1]:(column + 1) * PANEL] == WHITE).all()


RANDOM_DROPS = {"name": "random-drops", "stages": [
    {"method": "random", "at": "post_encoder", "params": {"keep_ratio": 0.5, "seed": 3}},
    {"method": "random", "at": "decoder_layer", "layers": [1], "params": {"keep_ratio": 0.5, "seed": 5}},
]}


def check_canvas(canvas: Image.Image | np.ndarray, view: Image.Image, trace: list[tuple[str, torch.Tensor]],
                 grid: tuple[int, int], shown: tuple[int, int]) -> None:
    """The canvas of a random-drop trace: the first step (nothing dropped) shows each view patch in its panel
    cell; every later step dims exactly the pixels of the patches its owners drop, scaled to the panel."""
    rows, cols = grid
    size = expected_panel_size(*shown)
    array = np.asarray(canvas)
    assert array.shape == (TITLE + size[0], PANEL * len(trace), 3)
    owners = [owner[0][: rows * cols].reshape(rows, cols).numpy() for _, owner in trace]
    assert (owners[0] >= 0).all()
    full, *later = panels(array, len(trace), size)
    view_array, view_ys, view_xs = np.asarray(view), bounds(view.height, rows), bounds(view.width, cols)
    panel_ys, panel_xs = bounds(size[0], rows), bounds(size[1], cols)
    for r in range(rows):
        for c in range(cols):
            cell = full[panel_ys[r]:panel_ys[r + 1], panel_xs[c]:panel_xs[c + 1]].reshape(-1, 3)
            patch = view_array[view_ys[r]:view_ys[r + 1], view_xs[c]:view_xs[c + 1]].reshape(-1, 3)
            assert set(map(tuple, cell.tolist())) <= set(map(tuple, patch.tolist())), (r, c)
    assert view_array.min() >= 4  # so that every dimmed pixel differs from its undimmed value
    for owner, panel in zip(owners[1:], later, strict=True):
        dropped = owner < 0
        assert dropped.any() and not dropped.all()
        assert np.array_equal(panel, dimmed(full, spread(dropped, *size)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_every_family_dims_exactly_the_patches_its_trace_drops(family: str) -> None:
    """A tiny model of each registered family, each sample of its mixed-size batch where it has one (else
    of a plain batch): random drops at the encoder and at decoder layer 1, rendered by viz's own pieces."""
    record = FAMILIES[family]
    model = tiny_model(family)
    adapter = tokenpress.find_adapter(model)
    batch = record.mixed_batch(model, prompts(4)) if record.mixed_batch else record.batch(model, prompts(2), "left", 0)
    generator = torch.Generator().manual_seed(0)
    # normalised pixels in (-0.9, 0.9): with the default mean and std 0.5 every view pixel is in 13..242
    batch["pixel_values"] = torch.rand(batch["pixel_values"].shape, generator=generator) * 1.8 - 0.9
    samples = len(batch["input_ids"])
    for sample in range(samples):
        inputs = record.select(batch, sample)
        trace, grids = trace_prefill(model, inputs, RANDOM_DROPS)
        assert len(trace) == 3  # the encoder, the random stage, decoder layer 1
        _, rows, cols = (int(v) for v in grids[0])
        view = model_view(adapter.encoder_pixels(inputs, 0), None)
        canvas = coverage_canvas(adapter, inputs, trace, grids)
        check_canvas(canvas, view, trace, (rows, cols), adapter.view_size(inputs, 0))


@pytest.mark.parametrize("name", ZOO_NAMES)
@torch.no_grad()
def test_tokenpress_viz_on_the_zoo_models_dims_exactly_the_dropped_patches(name: str, tmp_path: Path) -> None:
    """Through ``visualize`` and its PNG, a 2:1 photo on each shipped model: the panels keep the picture's
    proportions as the processor resized it, and dim exactly what the trace of the same prefill drops."""
    picture = patch_picture(90, 180, (6, 12)).convert("RGB")
    source = tmp_path / "in.png"
    picture.save(source)
    model, processor = load_model(f"zoo:{name}", progress=False), load_processor(f"zoo:{name}")
    out = visualize(RANDOM_DROPS, source, tmp_path / "viz.png", model=f"zoo:{name}", prompt="describe",
                    loaded=(model, processor))
    inputs = process(processor, [picture], [chat_prompt(processor, "describe")])
    trace, grids = trace_prefill(model, inputs, RANDOM_DROPS)
    _, rows, cols = (int(v) for v in grids[0])
    adapter = tokenpress.find_adapter(model)
    view = model_view(adapter.encoder_pixels(inputs, 0), processor.image_processor)
    with Image.open(out) as image:
        canvas = np.asarray(image.convert("RGB"))
    if "image_grid_thw" in inputs:  # Qwen2.5-VL keeps the photo's proportions: a 2:1 view
        assert view.width == 2 * view.height
    check_canvas(canvas, view, trace, (rows, cols), (view.height, view.width))

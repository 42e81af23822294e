"""The shapes benchmark: answers agree with the rendered pixels, generation is deterministic.

The checks below read the rendered images with their own rules (pixel colour at a cell centre,
bounding box and fill ratio of the non-white pixels in a cell) and never look at ``Sample.objects``
or at how ``shapes`` computes answers, so a bug in either the renderer or the question logic
shows up as a disagreement.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tokenpress.data import shapes

GRID = 6


def _cell_pixels(img: np.ndarray, row: int, col: int) -> np.ndarray:
    cell = img.shape[0] // GRID
    return img[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]


def _read_cell(img: np.ndarray, row: int, col: int) -> tuple[str, str, str] | None:
    """(colour, shape, size) of the 0-based cell, read from pixels only; None when empty."""
    patch = _cell_pixels(img, row, col)
    cell = patch.shape[0]
    centre = tuple(int(v) for v in patch[cell // 2, cell // 2])
    if centre == (255, 255, 255):
        assert (patch == 255).all(), "an empty centre must mean an empty cell"
        return None
    names = [name for name, rgb in shapes.COLORS.items() if tuple(rgb) == centre]
    assert len(names) == 1, f"centre pixel {centre} is not a palette colour"
    mask = (patch != 255).any(-1)
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (h * w)
    shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
    size = "big" if w >= cell * 0.7 else "small"
    return names[0], shape, size


def _read_image(sample: shapes.Sample) -> dict[tuple[int, int], tuple[str, str, str]]:
    img = np.asarray(sample.image.convert("RGB"))
    cells = {}
    for r in range(GRID):
        for c in range(GRID):
            content = _read_cell(img, r, c)
            if content is not None:
                cells[(r, c)] = content
    return cells


def _answer_from_pixels(sample: shapes.Sample) -> str:
    """Answer the question from the image alone, parsing the question text with regexes."""
    cells = _read_image(sample)
    q = sample.question
    m = re.fullmatch(r"what (color|shape|size) is at (\d) (\d) \?", q)
    if m:
        content = cells.get((int(m[2]) - 1, int(m[3]) - 1))
        return "none" if content is None else content[("color", "shape", "size").index(m[1])]
    m = re.fullmatch(r"is there a (\w+) (\w+) \?", q)
    if m:
        return "yes" if any((col, sh) == (m[1], m[2]) for col, sh, _ in cells.values()) else "no"
    m = re.fullmatch(r"is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+) \?", q)
    assert m, f"unparsed question {q!r}"
    where_a = [rc for rc, (col, sh, _) in cells.items() if (col, sh) == (m[1], m[2])]
    where_b = [rc for rc, (col, sh, _) in cells.items() if (col, sh) == (m[4], m[5])]
    assert len(where_a) == 1 and len(where_b) == 1, "relative questions name unique objects"
    (ra, ca), (rb, cb) = where_a[0], where_b[0]
    if m[3] == "left or right of":
        assert ca != cb
        return "left" if ca < cb else "right"
    assert ra != rb
    return "above" if ra < rb else "below"


@pytest.fixture(scope="module")
def test_split() -> list[shapes.Sample]:
    return shapes.generate_split("test")


def test_answers_match_rendered_pixels(test_split: list[shapes.Sample]) -> None:
    for s in test_split[:400]:
        assert _answer_from_pixels(s) == s.answer, (s.index, s.question, s.answer)


def test_caption_matches_rendered_pixels() -> None:
    for s in shapes.generate_split("val", 30):
        cells = _read_image(s)
        for a, attribute in enumerate(("color", "shape", "size")):
            expected = []
            for r in range(GRID):
                for c in range(GRID):
                    content = cells.get((r, c))
                    expected.append(f"{r + 1} {c + 1} ? {'none' if content is None else content[a]}")
            assert shapes.caption(s.objects, attribute) == " ".join(expected)
        present = {(col, sh) for col, sh, _ in cells.values()}
        entries = shapes.caption(s.objects, "exists", np.random.default_rng(0)).split(" ? ")
        assert len(entries) == len(shapes.COLORS) * len(shapes.SHAPES) + 1
        words = shapes.caption(s.objects, "exists").split()
        for k in range(0, len(words), 4):
            color, shape, mark, answer = words[k : k + 4]
            assert mark == "?" and answer == ("yes" if (color, shape) in present else "no")


def test_test_split_size_and_family_coverage(test_split: list[shapes.Sample]) -> None:
    assert len(test_split) >= 1000
    counts = {f: sum(s.family == f for s in test_split) for f in shapes.FAMILIES}
    assert set(counts) == set(shapes.FAMILIES) and len(shapes.FAMILIES) >= 4
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    vocab = set(shapes.vocabulary())
    for s in test_split:
        assert set(s.question.split()) <= vocab
        assert s.answer in vocab and " " not in s.answer
    # answers within a family are not one constant
    for f in shapes.FAMILIES:
        assert len({s.answer for s in test_split if s.family == f}) >= 2, f


def test_generation_is_deterministic_and_splits_differ() -> None:
    def fingerprint(samples: list[shapes.Sample]) -> list[tuple[bytes, str, str]]:
        return [(s.image.tobytes(), s.question, s.answer) for s in samples]

    a = fingerprint(shapes.generate_split("test", 25, seed=0))
    assert a == fingerprint(shapes.generate_split("test", 25, seed=0))
    assert fingerprint(shapes.generate_split("test", 5, seed=0)) == a[:5]
    val = fingerprint(shapes.generate_split("val", 25, seed=0))
    train = [shapes.render(shapes.training_scene(i)[0]).tobytes() for i in range(25)]
    other_seed = fingerprint(shapes.generate_split("test", 25, seed=1))
    images = {x[0] for x in a}
    assert not images & {x[0] for x in val}
    assert not images & set(train)
    assert not images & {x[0] for x in other_seed}
    assert len(images) == 25


def test_training_scene_is_deterministic() -> None:
    objs, qas = shapes.training_scene(7, seed=3, n_questions=5)
    assert (objs, qas) == shapes.training_scene(7, seed=3, n_questions=5)
    assert len(qas) == 5
    sample = shapes.Sample(shapes.render(objs), "", "", "", objs)
    cells = _read_image(sample)
    assert len(cells) == len(objs)


def test_score_overall_and_per_family(test_split: list[shapes.Sample]) -> None:
    samples = test_split[:50]
    perfect = shapes.score([s.answer for s in samples], samples)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == 50
    assert set(perfect["per_family"]) == set(shapes.FAMILIES)
    # model outputs are normalised: case, trailing tokens and punctuation do not matter
    assert shapes.score([f" {s.answer.upper()} </s>" for s in samples], samples)["accuracy"] == 1.0
    wrong_colors = [("xyz" if s.family == "color_at" else s.answer) for s in samples]
    res = shapes.score(wrong_colors, samples)
    assert res["per_family"]["color_at"] == 0.0
    assert res["per_family"]["shape_at"] == 1.0
    assert res["accuracy"] == pytest.approx(1 - sum(s.family == "color_at" for s in samples) / 50)
    with pytest.raises(ValueError):
        shapes.score(["a"], samples)


def test_prompt_and_pixel_array() -> None:
    s = shapes.generate_split("test", 2)
    assert shapes.build_prompt(s[0].question) == f"<image>\n{s[0].question}"
    arr = shapes.to_pixel_array([x.image for x in s], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert arr.shape == (2, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and arr.dtype == np.float32
    raw = np.asarray(s[1].image, dtype=np.float32)[10, 20]
    assert np.allclose(arr[1, :, 10, 20], (raw / 255 - 0.5) / 0.25)
    big = shapes.render(s[0].objects, image_size=192)
    assert big.size == (192, 192)
    assert big.getpixel(shapes.cell_center(0, 0, 192)) == s[0].image.getpixel(shapes.cell_center(0, 0))

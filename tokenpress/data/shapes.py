"""Procedural "shapes" benchmark: grids of small coloured objects and fine-grained spatial questions.

Why this data set: token-compression methods are judged by how much accuracy they lose when a
vision-language model sees fewer visual tokens.  Natural-image benchmarks often tolerate dropping
most tokens; here every question depends on one or two specific cells of a 6x6 grid, or on finding
an object that may be anywhere, so losing the tokens that cover those cells costs accuracy.  Everything is
generated from a seed, needs no download, and is small enough for tiny models trained on a CPU.

An image is ``IMAGE_SIZE`` pixels square, split into ``GRID`` x ``GRID`` cells of ``CELL`` pixels.  A
cell is empty (white) or holds one object: a ``color`` (six saturated colours), a ``shape``
(square, circle, triangle) and a ``size`` (big, small), drawn centred in the cell, so the pixel at
the centre of a cell always has the object's colour.  Question families (``FAMILIES``):

- ``color_at``: "what color is at 3 5 ?" (row 3, column 5) -> a colour, or ``none`` for an empty cell
- ``shape_at``: "what shape is at 3 5 ?" -> a shape or ``none``
- ``size_at``: "what size is at 3 5 ?" -> ``big``, ``small`` or ``none``
- ``exists``: "is there a red square ?" -> ``yes`` / ``no`` (about half of each)
- ``relative_position``: "is the red square left or right of the blue circle ?" -> ``left`` /
  ``right`` (or "... above or below the ..." -> ``above`` / ``below``); both objects are unique
  by colour and shape in their image.

Cells are written "row column", numbered from 1 (top, left): the same compact "3 5 ?" that
precedes each cell's content in the training caption (``caption``), so that what a model learns
from captions carries over to questions.  Answers are one lower-case word, scored by exact match
(``score``).  The vocabulary is closed (``vocabulary``) so a word-level tokenizer covers
every prompt, caption and answer.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GRID = 6
CELL = 16
IMAGE_SIZE = GRID * CELL  # 96

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "cyan": (0, 190, 200),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
SIZES: tuple[str, ...] = ("big", "small")
# Half-extent in pixels (at CELL=16) of each size: big objects span 12 px, small ones 8 px.
_HALF_EXTENT = {"big": 6, "small": 4}

EMPTY = "none"
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size")
# What a training caption can describe: one attribute of every cell, or which objects exist.
CAPTION_KINDS: tuple[str, ...] = (*ATTRIBUTES, "exists")
FAMILIES: tuple[str, ...] = ("color_at", "shape_at", "size_at", "exists", "relative_position")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Default number of questions per split (train is an endless stream; see ``training_scene``).
SPLIT_SIZES: dict[str, int] = {"train": 20000, "val": 500, "test": 1000}
MIN_OBJECTS, MAX_OBJECTS = 10, 18

IMAGE_TOKEN = "<image>"
# Training-only prompt word: "<image> describe color" is answered with ``caption(objects, "color")``.
CAPTION_PROMPT = "describe"
_QUESTION_WORDS = (
    *("what", "color", "shape", "size", "is", "at", "there", "a", "yes", "no"),
    *("the", "left", "or", "right", "of", "above", "below", "?"),
)


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its grid cell (0-based ``row``/``col``) and its attributes."""

    row: int
    col: int
    color: str
    shape: str
    size: str

    @property
    def name(self) -> str:
        """The phrase that names the object in questions, e.g. ``"red square"``."""
        return f"{self.color} {self.shape}"


@dataclass
class Sample:
    """One benchmark item: an image, a question about it, its one-word answer and ground truth."""

    image: Image.Image
    question: str
    answer: str
    family: str
    objects: list[Obj] = field(default_factory=list)
    index: int = -1


def vocabulary() -> list[str]:
    """Every word that can appear in a question, caption or answer (the closed vocabulary)."""
    words: list[str] = []
    digits = [str(d) for d in range(1, GRID + 1)]
    for w in [*_QUESTION_WORDS, *COLORS, *SHAPES, *SIZES, EMPTY, *digits, *CAPTION_KINDS, CAPTION_PROMPT]:
        if w not in words:
            words.append(w)
    return words


# ----------------------------------------------------------------------------------------------
# scenes and rendering


def random_scene(rng: np.random.Generator) -> list[Obj]:
    """Draw a scene: ``MIN_OBJECTS``..``MAX_OBJECTS`` objects in distinct cells, raster-sorted."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(GRID * GRID, size=n, replace=False).tolist())
    colors, shapes = list(COLORS), list(SHAPES)
    objs = []
    for cell in cells:
        objs.append(
            Obj(
                row=cell // GRID,
                col=cell % GRID,
                color=colors[int(rng.integers(len(colors)))],
                shape=shapes[int(rng.integers(len(shapes)))],
                size=SIZES[int(rng.integers(len(SIZES)))],
            )
        )
    return objs


def render(objects: Iterable[Obj], image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``objects`` on a white RGB image of ``image_size`` pixels (a multiple of ``GRID``).

    Shapes are drawn without anti-aliasing and centred in their cell, so the centre pixel of an
    occupied cell is exactly the object's colour and an empty cell is exactly ``BACKGROUND``.
    """
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID}, got {image_size}")
    cell = image_size // GRID
    scale = cell / CELL
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx = o.col * cell + cell // 2
        cy = o.row * cell + cell // 2
        h = max(1, round(_HALF_EXTENT[o.size] * scale))
        fill = COLORS[o.color]
        if o.shape == "square":
            draw.rectangle([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
        elif o.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - h), (cx - h, cy + h - 1), (cx + h - 1, cy + h - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img


def cell_center(row: int, col: int, image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """Pixel ``(x, y)`` at the centre of the 0-based cell ``(row, col)``."""
    cell = image_size // GRID
    return col * cell + cell // 2, row * cell + cell // 2


def cell_descriptions(objects: Iterable[Obj], attribute: str) -> list[tuple[int, int, str]]:
    """``(row, col, word)`` for all cells in raster order (1-based): the cell's ``attribute``
    (``"color"``, ``"shape"`` or ``"size"``) or ``"none"``."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {', '.join(ATTRIBUTES)}")
    grid: dict[tuple[int, int], Obj] = {(o.row, o.col): o for o in objects}
    out = []
    for r in range(GRID):
        for c in range(GRID):
            o = grid.get((r, c))
            out.append((r + 1, c + 1, EMPTY if o is None else getattr(o, attribute)))
    return out


def caption(objects: Iterable[Obj], kind: str, rng: np.random.Generator | None = None) -> str:
    """A dense description used as a training target (prompt ``"describe <kind>"``).

    ``kind`` is an attribute -- every cell as "row column ? word" ("1 1 ? none 1 2 ? red ...") --
    or ``"exists"`` -- every colour-shape pair as "colour shape ? yes|no" ("red square ? yes ...").

    Why: dense targets are what make from-scratch training converge (questions alone leave a tiny
    model at chance), and each entry ends exactly like the matching question ("what color is at
    1 2 ?", "is there a red square ?"), so what the decoder learns from captions is what the
    questions need.  Training passes ``rng`` to list the entries in a random order: in raster
    order a model can tell the cell from the position in the caption alone and never learns to
    read the coordinates.
    """
    objects = list(objects)
    if kind == "exists":
        present = {o.name for o in objects}
        entries = [f"{c} {s} ? {'yes' if f'{c} {s}' in present else 'no'}" for c in COLORS for s in SHAPES]
    else:
        entries = [f"{r} {c} ? {word}" for r, c, word in cell_descriptions(objects, kind)]
    if rng is not None:
        entries = [entries[k] for k in rng.permutation(len(entries))]
    return " ".join(entries)


# ----------------------------------------------------------------------------------------------
# questions


def _at_question(objects: Sequence[Obj], attr: str, rng: np.random.Generator) -> tuple[str, str]:
    grid = {(o.row, o.col): o for o in objects}
    occupied = [(o.row, o.col) for o in objects]
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in grid]
    # Mostly occupied cells, so "none" is a minority answer (about 20%).
    pool = empty if (empty and rng.random() < 0.2) else occupied
    r, c = pool[int(rng.integers(len(pool)))]
    o = grid.get((r, c))
    answer = EMPTY if o is None else getattr(o, attr)
    return f"what {attr} is at {r + 1} {c + 1} ?", answer


def _exists_question(objects: Sequence[Obj], rng: np.random.Generator) -> tuple[str, str]:
    present = sorted({o.name for o in objects})
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    # Half the questions name an object that is there, half one that is not.
    if absent and (not present or rng.random() < 0.5):
        return f"is there a {absent[int(rng.integers(len(absent)))]} ?", "no"
    return f"is there a {present[int(rng.integers(len(present)))]} ?", "yes"


def _relative_question(objects: Sequence[Obj], rng: np.random.Generator) -> tuple[str, str] | None:
    counts = Counter(o.name for o in objects)
    unique = [o for o in objects if counts[o.name] == 1]
    pairs = [(a, b) for a in unique for b in unique if a is not b]
    if not pairs:
        return None
    for _ in range(20):
        a, b = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5 and a.col != b.col:
            ans = "left" if a.col < b.col else "right"
            return f"is the {a.name} left or right of the {b.name} ?", ans
        if a.row != b.row:
            ans = "above" if a.row < b.row else "below"
            return f"is the {a.name} above or below the {b.name} ?", ans
    return None


def ask(objects: Sequence[Obj], family: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A random question of ``family`` about ``objects`` and its answer (None if impossible)."""
    if family == "color_at":
        return _at_question(objects, "color", rng)
    if family == "shape_at":
        return _at_question(objects, "shape", rng)
    if family == "size_at":
        return _at_question(objects, "size", rng)
    if family == "exists":
        return _exists_question(objects, rng)
    if family == "relative_position":
        return _relative_question(objects, rng)
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    # Each (seed, split, index) has its own stream: samples are reproducible one by one and the
    # splits never share a stream.
    return np.random.default_rng([seed, SPLITS[split], index])


def make_sample(split: str, index: int, seed: int = 0, family: str | None = None) -> Sample:
    """The ``index``-th sample of ``split`` (family cycles through ``FAMILIES`` unless given)."""
    rng = _rng(split, seed, index)
    family = family or FAMILIES[index % len(FAMILIES)]
    while True:
        objects = random_scene(rng)
        qa = ask(objects, family, rng)
        if qa is not None:
            break
    question, answer = qa
    return Sample(render(objects), question, answer, family, objects, index)


def generate_split(split: str, n: int | None = None, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of ``split`` (default ``SPLIT_SIZES[split]``); deterministic.

    Families are balanced: sample ``i`` belongs to ``FAMILIES[i % len(FAMILIES)]``.
    """
    n = SPLIT_SIZES[split] if n is None else n
    return [make_sample(split, i, seed) for i in range(n)]


def training_scene(
    index: int, seed: int = 0, n_questions: int = 8, family_weights: Sequence[float] | None = None
) -> tuple[list[Obj], list[tuple[str, str, str]]]:
    """Scene ``index`` of the endless training stream and ``n_questions`` (family, q, a) about it.

    ``family_weights`` (aligned with ``FAMILIES``) lets training ask the harder families more often.
    """
    rng = _rng("train", seed, index)
    objects = random_scene(rng)
    p = None if family_weights is None else np.asarray(family_weights, dtype=float) / sum(family_weights)
    qas: list[tuple[str, str, str]] = []
    while len(qas) < n_questions:
        family = FAMILIES[int(rng.choice(len(FAMILIES), p=p))]
        qa = ask(objects, family, rng)
        if qa is not None and all(qa[0] != q for _, q, _ in qas):  # no repeats: no copying answers
            qas.append((family, *qa))
    return objects, qas


# ----------------------------------------------------------------------------------------------
# prompts and scoring


def build_prompt(question: str, image_token: str = IMAGE_TOKEN) -> str:
    """The text fed to a processor: the image placeholder, a newline, the question.

    The processor expands the single ``image_token`` into as many placeholders as the model has
    visual tokens; the checkpoints' chat templates produce the same string.
    """
    return f"{image_token}\n{question}"


def normalize_answer(text: str) -> str:
    """First word of a model's output, lower-cased (answers are single words)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def score(predictions: Sequence[str], samples: Sequence[Any]) -> dict[str, float | int | dict[str, float]]:
    """Exact-match accuracy overall and per family: ``{"accuracy", "n", "per_family": {...}}``.

    ``samples`` are :class:`Sample` objects or anything else with their ``answer`` and ``family``.
    """
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    hits: dict[str, list[bool]] = defaultdict(list)
    for pred, s in zip(predictions, samples, strict=True):
        hits[s.family].append(normalize_answer(pred) == s.answer)
    allhits = [h for v in hits.values() for h in v]
    return {
        "accuracy": float(np.mean(allhits)) if allhits else 0.0,
        "n": len(allhits),
        "per_family": {f: float(np.mean(hits[f])) for f in FAMILIES if hits[f]},
    }


def to_pixel_array(images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Images -> normalised float32 array (N, 3, H, W): ``(pixel / 255 - mean) / std``.

    This is exactly what the llava-shapes image processor does (no resize or crop: the images are
    already ``IMAGE_SIZE`` square); useful for fast batched training and for checking processors.
    """
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

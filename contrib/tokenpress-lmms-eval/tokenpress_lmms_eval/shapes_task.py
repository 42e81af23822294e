"""tokenpress's shapes benchmark as a local lmms-eval task, ``tokenpress_shapes``.

    tokenpress-lmms-shapes --out tasks/ --n 50      # tasks/tokenpress_shapes.yaml + tasks/tokenpress_shapes.parquet
    python -m lmms_eval --model tokenpress --model_args pretrained=zoo:llava-shapes \\
        --tasks tokenpress_shapes --include_path tasks/ --batch_size 50

The data file holds the first ``n`` questions of a split exactly as ``tokenpress eval`` makes them
(:func:`tokenpress.data.shapes.make_sample`: the image, losslessly as PNG, the question, its answer and family);
nothing is downloaded. The task asks each question with greedy decoding and two new tokens, like ``tokenpress
eval``, and scores with :func:`tokenpress.data.shapes.score`: ``accuracy`` over all questions and one metric per
question family (``color_at``, ``shape_at``, ...), each computed over that family's questions alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from tokenpress.core.errors import InputError
from tokenpress.data import shapes
from tokenpress.measure.evaluate import Truth

TASK_NAME = "tokenpress_shapes"
TASK_FILE = f"{TASK_NAME}.yaml"
DATA_FILE = f"{TASK_NAME}.parquet"  # the name the task file gives; lmms-eval reads it next to the task file
METRICS: tuple[str, ...] = ("accuracy", *shapes.FAMILIES)


def write_task(out: str | Path, n: int = 50, split: str = "test", seed: int = 0) -> Path:
    """Write the task file and the first ``n`` questions of ``split`` (``seed`` as in ``tokenpress eval``) into
    the folder ``out``; returns the task file's path."""
    import datasets

    if split not in shapes.SPLIT_SIZES:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(shapes.SPLIT_SIZES)}")
    available = shapes.SPLIT_SIZES[split]
    if not 1 <= n <= available:
        raise InputError(f"--n {n}: the {split} split has {available} questions; ask for 1 to {available}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    samples = [shapes.make_sample(split, index, seed) for index in range(n)]
    features = datasets.Features({"index": datasets.Value("int32"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "family": datasets.Value("string"),
                                  "image": datasets.Image()})
    columns = {"index": [s.index for s in samples], "question": [s.question for s in samples],
               "answer": [s.answer for s in samples], "family": [s.family for s in samples],
               "image": [s.image for s in samples]}
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / DATA_FILE))
    with resources.as_file(resources.files(__package__) / TASK_FILE) as template:
        shutil.copyfile(template, folder / TASK_FILE)
    return folder / TASK_FILE


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """The document's record under ``accuracy`` and under its family's metric (so that metric sees only its
    family); ``score`` (0 or 1) is what lmms-eval's standard errors read."""
    record = {"prediction": results[0], "answer": doc["answer"], "family": doc["family"]}
    record["score"] = accuracy([record])
    return {"accuracy": record, doc["family"]: record}


def accuracy(records: list[dict[str, Any]]) -> float:
    """Exact-match accuracy of ``records`` by :func:`tokenpress.data.shapes.score` (lmms-eval's aggregation)."""
    scored = shapes.score([r["prediction"] for r in records], [Truth(r["answer"], r["family"]) for r in records])
    return float(scored["accuracy"])


def main(argv: list[str] | None = None) -> int:
    """``tokenpress-lmms-shapes --out DIR [--n N] [--split S] [--seed K]``: write the task; one line on a bad input."""
    parser = argparse.ArgumentParser(prog="tokenpress-lmms-shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the task and its data into")
    parser.add_argument("--n", type=int, default=50, help="number of questions (as `tokenpress eval --n`)")
    parser.add_argument("--split", default="test", choices=tuple(shapes.SPLIT_SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        task = write_task(args.out, n=args.n, split=args.split, seed=args.seed)
    except InputError as exc:
        print(f"tokenpress-lmms-shapes: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {task} and {task.parent / DATA_FILE} ({args.n} {args.split} questions); run it with "
          f"--include_path {task.parent} --tasks {TASK_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure a zoo checkpoint with ``tokenpress eval`` and write its model card.

The card's accuracy table is exactly what ``tokenpress eval`` prints for the uncompressed model
and for the ``random`` plugin at 50%, 25% and 11% of the visual tokens kept, on the test split.
That is the benchmark's sensitivity bar: keeping a random 11% must cost at least 20 points, or the
benchmark could not tell a good compression method from a bad one.  ``eval.json`` next to the
weights keeps the measured rows, so the card can be re-rendered without re-running, and a test can
check that ``tokenpress eval`` on an empty stack still reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenpress.evaluate import Row, evaluate
from tokenpress.stack import Stack, load_stack

RANDOM_KEEP_RATIOS: tuple[float, ...] = (0.5, 0.25, 0.11)
CARD_QUESTIONS = 1000
EVAL_FILE = "eval.json"
CARD_FILE = "MODEL_CARD.md"
TRAINING_FILE = "metrics.json"


def random_stack(keep_ratio: float, seed: int = 0) -> Stack:
    """The stack ``random`` keeping ``keep_ratio`` of each image's visual tokens (named random-NN)."""
    return load_stack({
        "name": f"random-{round(100 * keep_ratio)}",
        "stages": [{"method": "random", "params": {"keep_ratio": keep_ratio, "seed": seed}}],
    })


def measure(folder: str | Path, n: int = CARD_QUESTIONS, batch_size: int = 50, progress: bool = True) -> dict[str, Any]:
    """Run ``tokenpress eval`` (baseline + random at each of ``RANDOM_KEEP_RATIOS``) and save ``eval.json``."""
    folder = Path(folder)
    stacks = [random_stack(ratio) for ratio in RANDOM_KEEP_RATIOS]
    rows = evaluate(stacks, model=str(folder), n=n, batch_size=batch_size, progress=progress)
    result = {
        "split": "test",
        "n": n,
        "seed": 0,
        "command": f"tokenpress eval STACKS --model {folder.name} --n {n}",
        "rows": [asdict(row) for row in rows],
    }
    (folder / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def load_rows(folder: str | Path) -> list[Row]:
    """The rows measured by :func:`measure` for the checkpoint in ``folder``."""
    data = json.loads((Path(folder) / EVAL_FILE).read_text(encoding="utf-8"))
    return [Row(**row) for row in data["rows"]]


def markdown_table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    """A Markdown table; the columns from index ``right_from`` on are right-aligned (numbers)."""
    aligns = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_table(rows: list[Row]) -> str:
    """Markdown: accuracy overall and per family (in %), tokens kept, for each measured stack."""
    families = list(rows[0].per_family)
    return markdown_table(
        ["stack", "visual tokens kept", "accuracy", *families],
        [[row.stack, f"{100 * row.tokens_kept:.0f}%", f"{100 * row.accuracy:.1f}",
          *(f"{100 * row.per_family[f]:.1f}" for f in families)] for row in rows],
    )


def sensitivity_line(rows: list[Row]) -> str:
    """One sentence: the points lost with a random 11% kept, against the 20-point bar."""
    base = rows[0]
    worst = min(rows[1:], key=lambda row: row.tokens_kept)
    drop = 100 * (base.accuracy - worst.accuracy)
    verdict = "meets" if drop >= 20 else "does NOT meet"
    return (f"Keeping a random {100 * worst.tokens_kept:.0f}% of the visual tokens costs {drop:.1f} points "
            f"({100 * base.accuracy:.1f} -> {100 * worst.accuracy:.1f}), which {verdict} the benchmark's bar of 20.")


def write_model_card(folder: str | Path) -> Path:
    """(Re)write ``MODEL_CARD.md`` from ``metrics.json`` (training) and ``eval.json`` (measurement)."""
    from tokenpress.zoo.train import model_card

    folder = Path(folder)
    training = json.loads((folder / TRAINING_FILE).read_text(encoding="utf-8"))
    measured = json.loads((folder / EVAL_FILE).read_text(encoding="utf-8"))
    rows = load_rows(folder)
    results = (
        f"## Accuracy on the test split\n\n"
        f"{measured['n']} questions (`tokenpress.data.shapes.generate_split(\"test\", {measured['n']})`, balanced "
        f"over the question families), exact match of the greedy one-word answer, in %. Measured with\n\n"
        f"```\ntokenpress eval stacks/empty.yaml --model zoo:{training['name']} --n {measured['n']}\n```\n\n"
        f"and, for the sensitivity bar, the `random` plugin (seed 0) keeping 50%, 25% and 11% of each image's "
        f"visual tokens (`tokenpress.zoo.card.random_stack`), all in one `tokenpress eval` run.\n\n"
        f"{accuracy_table(rows)}\n\n{sensitivity_line(rows)}\n"
    )
    path = folder / CARD_FILE
    path.write_text(model_card(training) + "\n" + results, encoding="utf-8")
    return path

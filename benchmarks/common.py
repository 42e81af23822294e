"""What the benchmark scripts share: run stacks given as dicts through one ``tokenpress eval`` run."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from tokenpress.measure import evaluate


def arguments(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The shared options (model, n, batch size, JSON, plot), and a script's own through ``extra``."""
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--model", default="zoo:llava-shapes")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--plot", help="also plot accuracy retained against the FLOPs ratio")
    return parser.parse_args()


def runnable(stacks: list[dict], model: object) -> tuple[list[dict], list[str]]:
    """The stacks ``model`` can serve, and a line for each it refuses (its one-sentence reason)."""
    from tokenpress import UnsupportedModelError, load_stack
    from tokenpress.runtime.attach import check_stack, find_adapter

    adapter = find_adapter(model)
    kept, refused = [], []
    for stack in stacks:
        try:
            check_stack(load_stack(stack), adapter)
        except UnsupportedModelError as exc:
            refused.append(f"{stack['name']}: refused: {str(exc).split(': ', 2)[-1]}")
            continue
        kept.append(stack)
    return kept, refused


def run(stacks: list[dict], args: argparse.Namespace) -> None:
    """Evaluate ``stacks`` against the baseline in one run; print the table, write JSON and a plot.
    Stacks the model cannot serve are listed with their refusal and left out."""
    from tokenpress.runtime.loading import load_model_and_processor

    loaded = load_model_and_processor(args.model)
    stacks, refused = runnable(stacks, loaded[0])
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number, stack in enumerate(stacks):
            path = Path(folder) / f"{number:02d}.yaml"
            path.write_text(yaml.safe_dump(stack), encoding="utf-8")
            paths.append(path)
        rows = evaluate.evaluate(paths, model=args.model, n=args.n, batch_size=args.batch_size, loaded=loaded)
    print(f"model {args.model}, {args.n} test questions\n")
    print(evaluate.format_table(rows))
    if refused:
        print("\n" + "\n".join(refused))
    if args.json:
        Path(args.json).write_text(evaluate.rows_to_json(rows), encoding="utf-8")
    if args.plot:
        evaluate.plot_rows(rows, args.plot, title=f"{args.model}, n={args.n}", x="flops")

"""ALVTS against FastV, random and pool on a shipped proxy, at 89%, 75% and 50% compression, in one
``tokenpress eval`` run (the tables of docs/methods/alvts.md).

    python benchmarks/alvts_eval.py --model zoo:llava-shapes --n 1000
    python benchmarks/alvts_eval.py --model zoo:qwen2.5-vl-shapes --n 1000

How the compressions are matched: ALVTS at ``keep_ratio`` r routes r of the visual tokens through
every decoder layer, so the decoder does r of the uncompressed visual-token work; dropping 1 - r of
the tokens before the LLM (``random``, ``pool``) does the same work at every layer, so those rows are
matched by construction (the FLOPs column shows the small differences: attention's quadratic term
and ALVTS's scoring). FastV keeps every token through its first K = 2 layers (the paper's setting),
so at the same ``keep_ratio`` it does more work; its FLOPs ratio says how much.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from tokenpress import evaluate

RATIOS = {"89%": 0.11, "75%": 0.25, "50%": 0.5}
POOL_KERNELS = {"89%": 3, "75%": 2}  # 144 = 12 x 12 tokens: 3x3 windows keep 16 (11.1%), 2x2 keep 36 (25%)


def stacks(model: str) -> list[dict]:
    result = []
    for label, ratio in RATIOS.items():
        def stage(method: str, **params) -> dict:
            return {"method": method, "params": params}

        result += [
            {"name": f"alvts {label}", "stages": [stage("alvts", keep_ratio=ratio, selector=model)]},
            {"name": f"alvts adaptive {label}",
             "stages": [stage("alvts", keep_ratio=ratio, selector=model, budget="adaptive")]},
            {"name": f"alvts svd {label}", "stages": [stage("alvts", keep_ratio=ratio)]},
            {"name": f"fastv {label}", "stages": [{"method": "fastv", "layers": [2], "params": {"keep_ratio": ratio}}]},
            {"name": f"random {label}", "stages": [stage("random", keep_ratio=ratio)]},
        ]
        if label in POOL_KERNELS:
            result.append({"name": f"pool {label}", "stages": [stage("pool", kernel=POOL_KERNELS[label])]})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:llava-shapes")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--plot", help="also plot accuracy retained against FLOPs ratio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number, stack in enumerate(stacks(args.model)):
            path = Path(folder) / f"{number:02d}.yaml"
            path.write_text(yaml.safe_dump(stack), encoding="utf-8")
            paths.append(path)
        rows = evaluate.evaluate(paths, model=args.model, n=args.n, batch_size=args.batch_size)
    print(f"model {args.model}, {args.n} test questions\n")
    print(evaluate.format_table(rows))
    if args.json:
        Path(args.json).write_text(evaluate.rows_to_json(rows), encoding="utf-8")
    if args.plot:
        evaluate.plot_rows(rows, args.plot, title=f"{args.model}, n={args.n}", x="flops")
    return 0


if __name__ == "__main__":
    sys.exit(main())

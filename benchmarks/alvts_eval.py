"""ALVTS against FastV, random and pool on a shipped proxy, at 89%, 75% and 50% compression, in one
``tokenpress eval`` run (the tables of plugins/alvts/README.md).

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

import sys

import common

RATIOS = {"89%": 0.11, "75%": 0.25, "50%": 0.5}
POOL_KERNELS = {"89%": 3, "75%": 2}  # 144 = 12 x 12 tokens: 3x3 windows keep 16 (11.1%), 2x2 keep 36 (25%)


def stacks(model: str) -> list[dict]:
    result = []
    for label, ratio in RATIOS.items():
        def stage(method: str, **params) -> dict:
            return {"method": method, "params": params}

        result += [
            {"name": f"alvts {label}", "stages": [stage("alvts", keep_ratio=ratio, weights=model)]},
            {"name": f"alvts adaptive {label}",
             "stages": [stage("alvts", keep_ratio=ratio, weights=model, budget="adaptive")]},
            {"name": f"alvts svd {label}", "stages": [stage("alvts", keep_ratio=ratio)]},
            {"name": f"fastv {label}", "stages": [{"method": "fastv", "layers": [2], "params": {"keep_ratio": ratio}}]},
            {"name": f"random {label}", "stages": [stage("random", keep_ratio=ratio)]},
        ]
        if label in POOL_KERNELS:
            result.append({"name": f"pool {label}", "stages": [stage("pool", kernel=POOL_KERNELS[label])]})
    return result


def main() -> int:
    args = common.arguments(__doc__.splitlines()[0])
    common.run(stacks(args.model), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

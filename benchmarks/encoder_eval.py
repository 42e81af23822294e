"""The encoder-side methods (ToMe and FOLDER inside the vision encoder, PruMerge / PruMerge+ and
VisionZip from its attention) against pool, random, FastV and ALVTS at 50%, 25% and 11% of the
visual tokens, in one ``tokenpress eval`` run (the tables of plugins/tome/README.md).

    python benchmarks/encoder_eval.py --model zoo:llava-shapes --n 1000
    python benchmarks/encoder_eval.py --model zoo:qwen2.5-vl-shapes --n 1000

A stack the model cannot serve is listed with its one-sentence refusal and left out of the run
(Qwen2.5-VL: no class token, no merging between its windowed blocks). PruMerge keeps an adaptive
count: one row each for PruMerge and PruMerge+, at whatever share they keep. How the compressions
are matched: ``keep_ratio`` (random, FastV, ALVTS, ToMe, FOLDER, VisionZip) is the share of visual
tokens left; pool appears where a square kernel gives that share (12x12 -> 6x6 = 25%, -> 4x4 = 11%).
FastV keeps every token through its first K = 2 decoder layers (the paper's setting) and ALVTS routes
rather than drops, so their FLOPs ratios differ at the same share: the table says by how much.
"""

from __future__ import annotations

import sys

import common

RATIOS = {"50%": 0.5, "25%": 0.25, "11%": 0.11}
POOL_KERNELS = {"25%": 2, "11%": 3}


def one(name: str, method: str, layers: list[int] | None = None, **params) -> dict:
    stage: dict = {"method": method, "params": params}
    if layers is not None:
        stage["layers"] = layers
    return {"name": name, "stages": [stage]}


def stacks(model: str) -> list[dict]:
    rows = [one("prumerge", "prumerge"), one("prumerge+", "prumerge", plus=True)]
    for label, ratio in RATIOS.items():
        rows += [
            one(f"tome {label}", "tome", keep_ratio=ratio),
            one(f"folder {label}", "folder", keep_ratio=ratio),
            one(f"visionzip {label}", "visionzip", keep_ratio=ratio),
            one(f"random {label}", "random", keep_ratio=ratio),
            one(f"fastv {label}", "fastv", layers=[2], keep_ratio=ratio),
            one(f"alvts {label}", "alvts", keep_ratio=ratio, weights=model),
        ]
        if label in POOL_KERNELS:
            rows.append(one(f"pool {label}", "pool", kernel=POOL_KERNELS[label]))
    return rows


def main() -> int:
    args = common.arguments(__doc__.splitlines()[0])
    common.run(stacks(args.model), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

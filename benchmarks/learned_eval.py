"""The methods with weights (pixel_unshuffle, ldp) before and after ``tokenpress fit``, against pool
and random at the same token count (25%), in one ``tokenpress eval`` run.

    python benchmarks/learned_eval.py --model zoo:llava-shapes --n 1000
    python benchmarks/learned_eval.py --model zoo:qwen2.5-vl-shapes --n 1000

"fitted" rows use the weights shipped beside the proxy (``weights: zoo``), made by
``tokenpress fit`` (the commands are in docs/methods/pixel_unshuffle.md and ldp.md).
"""

from __future__ import annotations

import sys

import common


def stacks() -> list[dict]:
    def one(name: str, method: str, **params) -> dict:
        return {"name": name, "stages": [{"method": method, "params": params}]}

    return [
        one("pixel_unshuffle r=2 (unfitted)", "pixel_unshuffle", ratio=2),
        one("pixel_unshuffle r=2 (fitted)", "pixel_unshuffle", ratio=2, weights="zoo"),
        one("ldp stride 2 (unfitted)", "ldp", stride=2),
        one("ldp stride 2 (fitted)", "ldp", stride=2, weights="zoo"),
        one("pool k=2", "pool", kernel=2),
        one("random 25%", "random", keep_ratio=0.25),
    ]


def main() -> int:
    common.run(stacks(), common.arguments(__doc__.splitlines()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

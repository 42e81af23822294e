"""The methods with weights (pixel_unshuffle, ldp at 25% of the tokens; qformer at 16 and 32 queries)
before and after ``tokenpress fit``, against pool and random at the same token counts, in one
``tokenpress eval`` run.

    python benchmarks/learned_eval.py --model zoo:llava-shapes --n 1000
    python benchmarks/learned_eval.py --model zoo:qwen2.5-vl-shapes --n 1000

"fitted" rows use the weights shipped beside the proxy (``weights: zoo``), made by
``tokenpress fit`` (the commands are in the READMEs of plugins/pixel_unshuffle, plugins/ldp and
plugins/qformer);
``--fitted DIR`` takes each file found in that folder of ``tokenpress fit`` outputs instead (the
qformer weights for the Qwen2.5-VL proxy are not shipped, fitting made them worse: see qformer.md).
pool appears where a kernel gives the same count (LLaVA-1.5 proxy: 12x12 -> 4x4 = 16 at kernel 3;
the Qwen2.5-VL proxy's 6x6 grid has no kernel that gives 16 or 32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import common

#: Visual tokens per image of each shipped proxy (LLaVA-1.5: 96 px / patch 8; Qwen2.5-VL: 96 px, 2x2 merge).
PROXY_TOKENS = {"zoo:llava-shapes": 144, "zoo:qwen2.5-vl-shapes": 36}


def one(name: str, method: str, **params) -> dict:
    return {"name": name, "stages": [{"method": method, "params": params}]}


def stacks(tokens: int, fitted: str | None = None) -> list[dict]:
    def weights(name: str) -> str:
        path = Path(fitted or "") / name
        return str(path) if fitted is not None and path.is_file() else "zoo"

    rows = [
        one("pixel_unshuffle r=2 (unfitted)", "pixel_unshuffle", ratio=2),
        one("pixel_unshuffle r=2 (fitted)", "pixel_unshuffle", ratio=2,
            weights=weights("pixel_unshuffle-ratio2.safetensors")),
        one("ldp stride 2 (unfitted)", "ldp", stride=2),
        one("ldp stride 2 (fitted)", "ldp", stride=2, weights=weights("ldp-stride2.safetensors")),
        one("pool k=2", "pool", kernel=2),
        one("random 25%", "random", keep_ratio=0.25),
    ]
    side = round(tokens ** 0.5)
    for queries in (16, 32):
        rows += [one(f"qformer {queries} (unfitted)", "qformer", queries=queries),
                 one(f"qformer {queries} (fitted)", "qformer", queries=queries,
                     weights=weights(f"qformer-heads4-layers2-queries{queries}.safetensors"))]
        kernel = next((k for k in range(2, side + 1) if (-(-side // k)) ** 2 == queries), None)
        if kernel is not None:
            rows.append(one(f"pool k={kernel} ({queries})", "pool", kernel=kernel))
        if queries < tokens:
            rows.append(one(f"random {queries}", "random", keep_ratio=queries / tokens))
    return rows


def main() -> int:
    args = common.arguments(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--fitted", metavar="DIR", help="fitted weights found in DIR (tokenpress fit's files) instead of the zoo's"))
    if args.model not in PROXY_TOKENS:
        print("learned_eval compares at the shipped proxies' token counts; --model is one of "
              + ", ".join(PROXY_TOKENS))
        return 2
    common.run(stacks(PROXY_TOKENS[args.model], args.fitted), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

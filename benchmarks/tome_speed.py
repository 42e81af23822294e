"""ToMe's speed on this machine: the whole prefill (vision encoder + projector + LLM) with a constant
``r`` per encoder block, against the uncompressed model measured in the same run, and against the
speedup its FLOPs imply (``efficiency`` = measured / FLOPs-implied). FOLDER and pool at 25% for
comparison. A benchmark, not a test.

    python benchmarks/tome_speed.py                       # LLaVA-1.5 geometry, small (configs/), CPU
    python benchmarks/tome_speed.py --config configs/llava-1.5-7b.json --dtype bfloat16   # on a GPU

Random weights: speed does not depend on them (the matching's outcome changes which tokens merge, not
how many).
"""

from __future__ import annotations

import argparse
import sys

import torch

from tokenpress.core.stack import load_stack
from tokenpress.measure.bench import bench, format_bench, model_from_config, synthetic_inputs


def stacks(r_values: list[int]) -> list:
    result = [load_stack({"name": f"tome r={r}", "stages": [{"method": "tome", "params": {"r": r}}]})
              for r in r_values]
    result += [load_stack({"name": "tome 25%", "stages": [{"method": "tome", "params": {"keep_ratio": 0.25}}]}),
               load_stack({"name": "folder 25%", "stages": [{"method": "folder", "params": {"keep_ratio": 0.25}}]}),
               load_stack({"name": "pool k=2 (25%)", "stages": [{"method": "pool", "params": {"kernel": 2}}]})]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llava-1.5-geometry-small.json")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--r", default="16,32,48,64", help="constant r values (tokens merged per encoder block)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = model_from_config(args.config, args.dtype)
    inputs = synthetic_inputs(model, args.batch_size)
    rows = bench(model, inputs, stacks([int(r) for r in args.r.split(",")]), repeats=args.repeats)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.config}, batch {args.batch_size}, {args.dtype}\n")
    print(format_bench(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a compressed forward would make a GPU wait for the host, counted on this CPU.

Runs one batched forward (3 prompts, left padding) of each family's tiny model, plain and under a
few stacks, inside :class:`tokenpress.testing.syncs.DataDependentOps`, and prints how many of the
operations that synchronise on CUDA tokenpress's core made, and the rest (transformers' own forward,
the model's encoder). What the stage calls make is the contract kit's check (none, for every built-in
method); the core's reads that remain are the prompt's layout (read before the encoder), the layout
of the kept tokens (between the pre-LLM stages and layer 0), one per decoder-layer ``Keep`` (its new
width) and one read of every count at the end of the prefill.

    python benchmarks/syncs.py [--family llava] [--sites]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

import tokenpress
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES
from tokenpress.testing.models import sample_prompts
from tokenpress.testing.syncs import DataDependentOps

STACKS: dict[str, list[dict] | None] = {
    "plain model": None,
    "attached, empty stack": [],
    "pool k=2": [{"method": "pool", "params": {"kernel": 2}}],
    "random 50%": [{"method": "random", "params": {"keep_ratio": 0.5}}],
    "fastv 50% @1": [{"method": "fastv", "at": "decoder_layer", "layers": [1], "params": {"keep_ratio": 0.5}}],
}
ROOT = Path(tokenpress.__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--sites", action="store_true", help="list the core's sites (file:line) too")
    args = parser.parse_args()
    print(f"{'family':<12} {'stack':<24} {'core':>5} {'other':>6}")
    for family in args.family or sorted(FAMILIES):
        for label, stages in STACKS.items():
            model = tiny_model(family)
            batch = FAMILIES[family].batch(model, sample_prompts(3), "left", 0)
            attached = tokenpress.compress(model, {"name": "syncs", "stages": stages}) if stages is not None else None
            with torch.no_grad():
                if attached is not None:
                    attached.__enter__()
                try:
                    with DataDependentOps() as recorder:
                        model(**batch)
                finally:
                    if attached is not None:
                        attached.__exit__(None, None, None)
            core = [event for event in recorder.events if event.origin == "core"]
            print(f"{family:<12} {label:<24} {len(core):>5} {len(recorder.events) - len(core):>6}")
            if args.sites:
                for where, count in sorted(collections.Counter(e.where for e in core).items()):
                    print(f"{'':<30}{count:>3}  {Path(where).resolve().relative_to(ROOT)}")


if __name__ == "__main__":
    main()

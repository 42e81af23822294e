"""``tokenpress bench`` and ``tokenpress profile`` (subcommands of :mod:`tokenpress.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from tokenpress.errors import TokenpressError


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    import platform

    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _model_and_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from tokenpress import bench

    if args.config:
        if not Path(args.config).is_file():
            raise TokenpressError(f"{args.config}: no such config file")
        model = bench.model_from_config(args.config, dtype=args.dtype, attn=args.attn)
        return model, bench.synthetic_inputs(model, args.batch_size, args.text_tokens), None
    from tokenpress.loading import load_model_and_processor

    model, processor = load_model_and_processor(args.model)
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    inputs = bench.checkpoint_inputs(processor, args.batch_size)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return model, inputs, processor


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenpress import bench, evaluate

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]  # "": the interception alone
    stacks = bench.sweep_stacks(methods, [float(r) for r in args.ratios.split(",")], args.layer)
    model, inputs, processor = _model_and_inputs(args)
    rows = bench.bench(model, inputs, stacks, repeats=args.repeats, progress=not args.quiet)
    if processor is not None and args.accuracy_n > 0 and str(args.model).startswith("zoo:"):
        accuracy = evaluate.evaluate(stacks, model=args.model, n=args.accuracy_n, progress=not args.quiet,
                                     loaded=(model, processor))
        retention = {row.stack: row.retention for row in accuracy}
        for row in rows:
            row.accuracy_retention = retention.get(row.stack)
    table = bench.format_bench(rows, _device_name())
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
        print(f"\nwrote {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps(bench.rows_as_dicts(rows), indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {bench.plot_bench(rows, args.plot)}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from tokenpress import bench
    from tokenpress.stack import load_stack

    stack = load_stack(args.stack)
    model, inputs, _ = _model_and_inputs(args)
    rows, totals, prof = bench.profile(model, inputs, stack, trace_dir=args.trace, max_new_tokens=args.max_new_tokens)
    print(bench.format_profile(rows, totals, _device_name()))
    if args.ops:
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print("\n" + prof.key_averages().table(sort_by=sort, row_limit=args.ops))
    if args.trace:
        print(f"\ntrace written to {args.trace} (open with: tensorboard --logdir {args.trace}, torch-tb-profiler)")
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="zoo:llava-shapes", help="zoo:NAME or a checkpoint folder")
    source.add_argument("--config", help="config.json of a model to build with random weights (no download)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa", "flash_attention_2"),
                        help="attention implementation (with --config)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=48, help="prompt length (with --config)")


def register(sub: Any) -> None:
    """Add the bench and profile subcommands to the CLI's subparsers."""
    p = sub.add_parser("bench", help="speed, FLOPs and memory of methods x keep ratios vs the uncompressed model")
    _model_options(p)
    p.add_argument("--methods", default="fastv,pool,random",
                   help="comma-separated methods to sweep (\"\": only the baseline and the empty stack)")
    p.add_argument("--ratios", default="0.5,0.25,0.11")
    p.add_argument("--layer", type=int, default=None,
                   help="layer K of decoder-layer methods (default: the method's own layers, else 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accuracy-n", type=int, default=200, help="questions for accuracy retention (zoo models)")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="torch.profiler run of a prefill and a short generation with a stack")
    p.add_argument("stack")
    _model_options(p)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--trace", metavar="DIR", help="write a TensorBoard profiler trace here")
    p.add_argument("--ops", type=int, default=0, metavar="N", help="also print the N most expensive operators")
    p.set_defaults(func=cmd_profile)

"""``tokenpress bench`` and ``tokenpress profile`` (subcommands of :mod:`tokenpress.tools.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenpress.core.errors import TokenpressError
from tokenpress.tools import outputs
from tokenpress.tools.arguments import non_negative_int, positive_int

if TYPE_CHECKING:
    import torch

# The commands import torch and the measurement layer when they run: building the parser (tokenpress --help,
# validate, schema) does not.


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, torch {torch.__version__})"

    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _model_and_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor], Any]:
    import torch

    from tokenpress.measure import bench
    from tokenpress.runtime.loading import load_model_and_processor

    if args.config:
        if not Path(args.config).is_file():
            raise TokenpressError(f"{args.config}: no such config file")
        model = bench.model_from_config(args.config, dtype=args.dtype, attn=args.attn)
        return model, bench.synthetic_inputs(model, args.batch_size, args.text_tokens), None

    model, processor = load_model_and_processor(args.model, progress=not getattr(args, "quiet", False))
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    inputs = bench.checkpoint_inputs(processor, args.batch_size)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return model, inputs, processor


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenpress.measure import bench, evaluate

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]  # "": the interception alone
    stacks = bench.sweep_stacks(methods, [float(r) for r in args.ratios.split(",")], args.layer)
    markdown = outputs.check_file(args.markdown, "--markdown", ".md", "the table") if args.markdown else None
    json_file = outputs.check_file(args.json, "--json", ".json", "the rows as JSON") if args.json else None
    plot = outputs.check_plot(args.plot, "--plot") if args.plot else None
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
    if markdown:
        outputs.write_text(markdown, table + "\n")
        print(f"\nwrote {markdown}")
    if json_file:
        outputs.write_text(json_file, json.dumps(bench.rows_as_dicts(rows), indent=2))
        print(f"wrote {json_file}")
    if plot:
        print(f"wrote {bench.plot_bench(rows, outputs.ready(plot))}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from tokenpress.core.stack import load_stack
    from tokenpress.measure import bench

    stack = load_stack(args.stack)
    trace = outputs.check_folder(args.trace, "--trace", "the profiler trace") if args.trace else None
    model, inputs, _ = _model_and_inputs(args)
    rows, totals, prof = bench.profile(model, inputs, stack, trace_dir=str(trace) if trace else None,
                                       max_new_tokens=args.max_new_tokens)
    print(bench.format_profile(rows, totals, _device_name()))
    if args.ops:
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print("\n" + prof.key_averages().table(sort_by=sort, row_limit=args.ops))
    if trace:
        print(f"\ntrace written to {trace} (open with: tensorboard --logdir {trace}, torch-tb-profiler)")
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="zoo:llava-shapes", help="zoo:NAME or a checkpoint folder")
    source.add_argument("--config", help="config.json of a model to build with random weights (no download)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa", "flash_attention_2"),
                        help="attention implementation (with --config)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--text-tokens", type=non_negative_int, default=48, help="prompt length (with --config)")


def register(sub: Any) -> None:
    """Add the bench and profile subcommands to the CLI's subparsers."""
    p = sub.add_parser("bench", help="speed, FLOPs and memory of methods x keep ratios vs the uncompressed model",
                       epilog=outputs.RULES)
    _model_options(p)
    p.add_argument("--methods", default="fastv,pool,random",
                   help="comma-separated methods to sweep (\"\": only the baseline and the empty stack)")
    p.add_argument("--ratios", default="0.5,0.25,0.11")
    p.add_argument("--layer", type=non_negative_int, default=None,
                   help="layer K of decoder-layer methods (default: the method's own layers, else 2)")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--accuracy-n", type=non_negative_int, default=200,
                   help="questions for accuracy retention (zoo models; 0: skip)")
    p.add_argument("--markdown", metavar="FILE", help="write the table to this .md file")
    p.add_argument("--json", metavar="FILE", help="write the rows to this .json file")
    p.add_argument("--plot", metavar="PNG", help="plot speedups against tokens kept into this .png file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="torch.profiler run of a prefill and a short generation with a stack",
                       epilog=outputs.RULES)
    p.add_argument("stack")
    _model_options(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.add_argument("--trace", metavar="DIR", help="write a TensorBoard profiler trace into this folder (created if "
                   "missing)")
    p.add_argument("--ops", type=non_negative_int, default=0, metavar="N",
                   help="also print the N most expensive operators")
    p.set_defaults(func=cmd_profile)

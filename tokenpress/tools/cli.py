"""The ``tokenpress`` command line.

User mistakes (a bad stack, a missing file, an unsupported model, an output path that cannot be
written) print one line and exit 2; no traceback. Output paths are checked before any work starts
(:mod:`tokenpress.tools.outputs`). Subcommands: ``plugins``, ``validate``, ``schema``, ``run``, ``eval``,
``leaderboard``, ``calibrate``, ``fit``, ``flops``, ``viz``, ``zoo``, and ``bench``/``profile``
(:mod:`tokenpress.tools.cli_bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tokenpress.core.errors import InputError, TokenpressError
from tokenpress.tools import outputs
from tokenpress.tools.arguments import non_negative_int, positive_float, positive_int

# Each command imports what it needs when it runs: building the parser (tokenpress --help) imports
# neither torch nor transformers.

EXIT_USAGE = 2

#: A mistake on the command line (missing file, bad option value).
UserError = InputError


def _registry() -> Any:
    from tokenpress.core.registry import get_registry

    return get_registry()


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry()
    rows = [(name, ", ".join(cls.points), registry.origins.get(name, "?"), cls.description)
            for name, cls in sorted(registry.methods.items())]
    if args.json:
        print(json.dumps([dict(zip(("name", "points", "origin", "description"), row, strict=True)) for row in rows],
                         indent=2))
        return 0
    width = max([len(r[0]) for r in rows] + [6])
    points_width = max([len(r[1]) for r in rows] + [6])
    print(f"{'method':<{width}}  {'points':<{points_width}}  origin")
    for name, points, origin, _ in rows:
        print(f"{name:<{width}}  {points:<{points_width}}  {origin}")
    families = ", ".join(f"{a.family} ({registry.origins.get('adapter:' + a.family, '?')})" for a in registry.adapters)
    print(f"\nmodel families: {families or 'none'}")
    return 0


def _check_stack(path: str, model_path: str | None) -> Any:
    from tokenpress.core.stack import load_stack

    stack = load_stack(path)
    if model_path:
        from tokenpress.runtime.attach import check_stack, find_adapter
        from tokenpress.runtime.loading import load_model

        model = load_model(model_path, meta=True)
        check_stack(stack, find_adapter(model))
    return stack


def cmd_validate(args: argparse.Namespace) -> int:
    stack = _check_stack(args.stack, args.model)
    print(f"{args.stack}: ok - stack {stack.name!r}, {len(stack.stages)} stage(s), positions {stack.positions}")
    for stage in stack.stages:
        print(f"  {stage.label()}  {stage.config.model_dump()}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from tokenpress.core.stack import dump_schema

    output = outputs.check_file(args.output, "--output", ".json", "the JSON schema") if args.output else None
    text = dump_schema()
    if output:
        outputs.write_text(output, text + "\n")
        print(f"wrote {output}")
    else:
        print(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import tokenpress
    from tokenpress.runtime.loading import chat_prompt, load_model, load_processor, open_image, process

    stack = tokenpress.load_stack(args.stack)
    image = open_image(args.image)
    processor = load_processor(args.model)  # inputs first: a refused image is said before the model loads
    inputs = process(processor, [image], [chat_prompt(processor, args.prompt)], what=args.image)
    model = load_model(args.model)
    with torch.no_grad(), tokenpress.compress(model, stack) as handle:
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        report = handle.report()
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    hint = _proxy_hint(args.model) if not answer.strip() else None
    if args.json:
        print(json.dumps({"answer": answer.strip(), "stack": stack.name, "stages": report.as_dicts()}, indent=2))
        if hint:
            print(hint, file=sys.stderr)  # stdout stays one JSON document
    else:
        print(f"answer: {answer.strip()}")
        if hint:
            print(hint)
        print()
        print(report)
    return 0


def _proxy_hint(model: str) -> str | None:
    """Why a zoo proxy gave an empty answer (it knows only the shapes benchmark's questions), or None
    for a model that is not a proxy."""
    from tokenpress.runtime.loading import resolve_model_path
    from tokenpress.tools import zoo_card as card
    from tokenpress.zoo import ZOO_NAMES

    if not str(model).startswith("zoo:"):  # a folder `tokenpress zoo train` wrote names its proxy in metrics.json
        try:
            trained = json.loads((resolve_model_path(model) / card.TRAINING_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(trained, dict) or trained.get("name") not in ZOO_NAMES:
            return None
    return (f"hint: {model} is a proxy trained only on the shapes benchmark's questions, such as "
            "\"what color is at 3 5 ?\" (row 3, column 5); other prompts get an empty answer")


def _number_list(text: str | None, option: str) -> list[float]:
    """``"0.5,0.25"`` -> [0.5, 0.25], each in (0, 1] (one line and exit 2 otherwise)."""
    if not text:
        return []
    values = []
    for part in (item.strip() for item in text.split(",") if item.strip()):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"{option} {text}: {part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise UserError(f"{option} {text}: {part} is not in (0, 1]")
        values.append(value)
    return values


def _known_methods(text: str | None, option: str) -> list[str]:
    """``"tome,fastv"`` -> ["tome", "fastv"], each a registered method (one line and exit 2 otherwise)."""
    from tokenpress.core.registry import get_registry

    methods = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in methods if name not in get_registry().methods]
    if unknown:
        raise UserError(f"{option}: unknown method {unknown[0]!r} (see tokenpress plugins)")
    return methods


def cmd_eval(args: argparse.Namespace) -> int:
    from tokenpress.measure import evaluate
    from tokenpress.runtime.loading import load_model_and_processor

    for path in args.stacks:
        _check_stack(path, None)
    methods = _known_methods(args.methods, "--methods")
    ratios, budgets = _number_list(args.ratios, "--ratios"), _number_list(args.match_flops, "--match-flops")
    if methods and not (ratios or budgets):
        raise UserError("--methods needs --ratios (keep ratios) or --match-flops (FLOPs budgets) to sweep")
    if (ratios or budgets) and not methods:
        raise UserError("--ratios and --match-flops sweep the methods named by --methods")
    if not args.stacks and not methods:
        raise UserError("give stack files, or --methods with --ratios or --match-flops")
    written = {option: outputs.check_file(value, option, suffix, what)
               for option, value, suffix, what in (("--json", args.json, ".json", "the rows as JSON"),
                                                   ("--csv", args.csv, ".csv", "the rows as CSV"))
               if value and value != "-"}  # '-': stdout
    plot = outputs.check_plot(args.plot, "--plot") if args.plot else None
    ranks = evaluate.Ranks.current()  # under torchrun / accelerate launch: the questions shared across ranks
    try:
        loaded = load_model_and_processor(args.model, progress=not args.quiet)
        swept, notes = evaluate.sweep_stacks(*loaded, methods, ratios, budgets, args.split, args.seed, args.layer)
        rows = evaluate.evaluate([*args.stacks, *swept], model=args.model, n=args.n, batch_size=args.batch_size,
                                 split=args.split, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                 progress=not args.quiet, ranks=ranks, loaded=loaded, notes=notes)
    except BaseException:
        ranks.close(wait=False)
        raise
    ranks.close()
    if ranks.rank != 0:
        return 0  # rank 0 speaks for the run
    ranked = f", {ranks.world} ranks" if ranks.world > 1 else ""
    print(f"model {args.model}, {args.n} questions of the {args.split} split (seed {args.seed}){ranked}\n")
    print(evaluate.format_table(rows))
    for option, value, render in (("--json", args.json, evaluate.rows_to_json),
                                  ("--csv", args.csv, evaluate.rows_to_csv)):
        if value == "-":
            print(render(rows))
        elif option in written:
            outputs.write_text(written[option], render(rows))
            print(f"\nwrote {written[option]}")
    if plot:
        print(f"wrote {evaluate.plot_rows(rows, outputs.ready(plot), title=f'{args.model}, n={args.n}')}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from tokenpress.measure import leaderboard

    models = tuple(model.strip() for model in args.models.split(",") if model.strip())
    methods = _known_methods(args.methods, "--methods") if args.methods else None
    budgets = _number_list(args.budgets, "--budgets")
    page = outputs.check_file(args.out, "--out", ".md", "the leaderboard page")
    outputs.check_folder(str(page.parent / page.stem), "--out", "the leaderboard's plots", plots=True)
    boards = leaderboard.run(models, n=args.n, batch_size=args.batch_size, progress=not args.quiet, methods=methods,
                             budgets=tuple(budgets))
    command = "tokenpress leaderboard"
    command += f" --models {args.models}" if args.models != LEADERBOARD_MODELS else ""
    command += f" --n {args.n}" if args.n != LEADERBOARD_N else ""
    command += f" --methods {args.methods}" if args.methods else ""
    command += f" --budgets {args.budgets}" if args.budgets != LEADERBOARD_BUDGETS else ""
    for path in leaderboard.write_page(boards, page, args.n, command, update=args.update):
        print(f"wrote {path}")
    return 0


#: The proxies of ``tokenpress leaderboard`` (tokenpress.measure.leaderboard.DEFAULT_MODELS, without importing torch).
LEADERBOARD_MODELS = "zoo:llava-shapes,zoo:qwen2.5-vl-shapes,zoo:llava-shapes-deep"
#: Questions per proxy of ``tokenpress leaderboard``.
LEADERBOARD_N = 600
#: The FLOPs budgets of ``tokenpress leaderboard`` (tokenpress.measure.leaderboard.BUDGETS, without importing torch).
LEADERBOARD_BUDGETS = "0.5,0.3"


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from tokenpress.runtime.loading import load_model_and_processor
    from tokenpress.tools import calibration

    stack = _check_stack(args.stack, None)
    stages = [stage for stage in stack.stages if stage.method_class.can_calibrate()]
    if not stages:
        methods = ", ".join(sorted(n for n, c in _registry().methods.items() if c.can_calibrate())) or "none"
        raise UserError(f"{args.stack}: no stage of this stack can be calibrated (methods that can: {methods})")
    if args.stage is not None:
        stages = [stage for stage in stages if stage.index == args.stage]
        if not stages:
            raise UserError(f"--stage {args.stage}: {args.stack} has no calibratable stage at that index")
    elif len(stages) > 1:
        indexes = [s.index for s in stages]
        raise UserError(f"{args.stack}: stages {indexes} can all be calibrated; choose one with --stage")
    stage = stages[0]
    out = outputs.check_file(args.out, "--out", ".safetensors", "the calibrated weights")
    train, held_out = calibration.split_samples(args.model, args.data, args.samples, args.seed)
    model, processor = load_model_and_processor(args.model, progress=not args.quiet)
    chat = args.data is not None
    spec = stage.as_dict()
    torch.manual_seed(args.seed)
    result = stage.method_class.calibrate(
        model, spec, list(calibration.batches(processor, train, args.batch_size, chat)),
        list(calibration.batches(processor, held_out, args.batch_size, chat)),
        epochs=args.epochs, lr=args.lr, seed=args.seed, progress=not args.quiet)
    print(f"model {args.model}: {len(train)} calibration samples, {len(held_out)} held out (seed {args.seed})\n")
    print(result.table())
    print(f"\nwrote {result.save(outputs.ready(out))}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from tokenpress.data import shapes
    from tokenpress.measure import evaluate
    from tokenpress.runtime.loading import load_model_and_processor
    from tokenpress.tools import calibration
    from tokenpress.tools import fit as fitting

    stack = _check_stack(args.stack, None)
    if not any(fitting.fits(stage.method_class) for stage in stack.stages):
        methods = ", ".join(sorted(n for n, c in _registry().methods.items() if fitting.fits(c)))
        calibrated = sorted({s.method for s in stack.stages if s.method_class.can_calibrate()})
        also = f"; {', '.join(calibrated)} learns with `tokenpress calibrate`" if calibrated else ""
        raise UserError(f"{args.stack}: no stage of this stack has weights to fit (methods with weights: "
                        f"{methods}){also}")
    out = outputs.check_folder(args.out, "--out", "the fitted weights")
    if args.resume and not (out / fitting.STATE_FILE).is_file():
        raise UserError(f"--resume: {out} holds no {fitting.STATE_FILE} to continue from (a fit saves it every "
                        f"{fitting.SAVE_EVERY} steps and at the end); drop --resume to start a new fit there")
    samples = min(args.steps * args.batch_size, shapes.SPLIT_SIZES["train"])
    train, held_out = calibration.split_samples(args.model, args.data, samples, args.seed)
    model, processor = load_model_and_processor(args.model, progress=not args.quiet)
    report = fitting.fit(model, processor, stack, train, held_out, out, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, chat=args.data is not None, resume=args.resume,
                         progress=not args.quiet)
    accuracy = None
    if args.data is None and args.eval_n:
        fitted = stack.as_dict()
        for entry, stage in zip(fitted["stages"], stack.stages, strict=True):
            label = stage.label()
            if label in report.files:
                entry["params"]["weights"] = str(report.files[label])
        fitted["name"] = f"{stack.name} (fitted)"
        initial = {**stack.as_dict(), "name": f"{stack.name} (initial)"}
        rows = evaluate.evaluate([initial, fitted], model=args.model, n=args.eval_n, split="val",
                                 batch_size=args.batch_size, progress=not args.quiet, loaded=(model, processor))
        accuracy = {"split": "val", "questions": args.eval_n, "before": rows[1].accuracy, "after": rows[2].accuracy}
        print(evaluate.format_table(rows) + "\n")
    card = fitting.write_card(out, report, args.stack, args.model, accuracy)
    print(card.read_text(encoding="utf-8"))
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from tokenpress.core.flops import format_breakdown, parse_image_size, simulate
    from tokenpress.runtime.loading import config_from_file

    stack = _check_stack(args.stack, None)
    if args.text_tokens < 0:
        raise UserError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    breakdown = simulate(config_from_file(args.config), stack, args.text_tokens, parse_image_size(args.image_size))
    if args.json:
        print(json.dumps({"config": args.config, **breakdown.as_dict()}, indent=2))
    else:
        print(f"config {args.config}")
        print(format_breakdown(breakdown))
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from tokenpress.tools.viz import visualize

    _check_stack(args.stack, None)
    output = outputs.check_file(args.output, "--output", ".png", "the picture")
    print(f"wrote {visualize(args.stack, args.image, outputs.ready(output), model=args.model, prompt=args.prompt)}")
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from tokenpress.tools.zoo_train import parse_overrides, run_from_args

    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    outputs.check_folder(str(args.out), "--out", "the checkpoint")
    return run_from_args(args, overrides)


def cmd_zoo_card(args: argparse.Namespace) -> int:
    from tokenpress.runtime.loading import resolve_model_path
    from tokenpress.tools import zoo_card as card
    from tokenpress.tools.zoo_options import check_not_shipped

    folder = resolve_model_path(args.model)
    if not (folder / card.TRAINING_FILE).is_file():
        raise UserError(f"{folder}: no {card.TRAINING_FILE}; model cards are written for checkpoints that "
                        "`tokenpress zoo train` made")
    out = Path(args.out) if args.out else folder
    check_not_shipped(out, "a model card (name another folder with --out)")
    outputs.check_folder(str(out), "--out" if args.out else "the model folder", "eval.json and MODEL_CARD.md")
    if args.no_measure and not (out / card.EVAL_FILE).is_file():
        raise UserError(f"--no-measure: {out} has no {card.EVAL_FILE} to render the card from")
    if not args.no_measure:
        card.measure(folder, n=args.n, batch_size=args.batch_size, out=out)
    print(card.write_model_card(folder, out).read_text(encoding="utf-8"))
    return 0


def _add_training_data_arguments(p: argparse.ArgumentParser) -> None:
    """STACK, --model and --data: what `calibrate` and `fit` learn from."""
    p.add_argument("stack")
    p.add_argument("--model", required=True, help="zoo:NAME or a checkpoint folder")
    p.add_argument("--data", metavar="FOLDER", help="images with prompts (prompts.jsonl, or NAME.png + NAME.txt); "
                   "required for a model that is not a shipped proxy")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (and exit code 2), like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokenpress", description="Stackable visual-token compression.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("plugins", help="list registered methods, their points and where they came from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a stack file (exit 0, or a message and exit 2)")
    p.add_argument("stack")
    p.add_argument("--model", help="also check layers etc. against this model folder (config only)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON schema of stack files", epilog=outputs.RULES)
    p.add_argument("--output", "-o", metavar="JSON", help="write to this .json file instead")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("run", help="answer a prompt about an image with a stack attached")
    p.add_argument("stack")
    p.add_argument("--model", required=True, help="model folder (from_pretrained) or zoo:NAME")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="accuracy, tokens, FLOPs and time of stacks vs the uncompressed model",
                       epilog=outputs.RULES)
    p.add_argument("stacks", nargs="*", metavar="STACK")
    p.add_argument("--model", default="zoo:llava-shapes", help="zoo:NAME or a checkpoint folder")
    p.add_argument("--methods", metavar="A,B", help="sweep these methods (no YAML needed): at --ratios and/or at "
                   "--match-flops budgets")
    p.add_argument("--ratios", metavar="R,R", help="keep ratios of the --methods sweep (each method's keep knob)")
    p.add_argument("--match-flops", metavar="F,F", help="FLOPs budgets of the --methods sweep: each method's knob "
                   "is solved so that its prefill FLOPs ratio on this model is the budget (the knob chosen is shown)")
    p.add_argument("--layer", type=non_negative_int, help="decoder layer of swept decoder methods without default "
                   "layers (default 2)")
    p.add_argument("-n", "--n", type=positive_int, default=1000,
                   help="number of questions (at most the split's size: train 20000, val 500, test 1000); "
                        "under torchrun write -n, which torchrun does not mistake for one of its own options")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=2)
    p.add_argument("--json", metavar="FILE", help="write the rows to this .json file ('-' for stdout)")
    p.add_argument("--csv", metavar="FILE", help="write the rows to this .csv file ('-' for stdout)")
    p.add_argument("--plot", metavar="PNG", help="plot accuracy retention against tokens kept into this .png file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("leaderboard", help="every registered method at 50/25/11%% of the visual tokens and at FLOPs "
                                           "budgets on the shipped proxies: one Markdown page with tables and plots",
                       epilog=outputs.RULES)
    p.add_argument("--models", default=LEADERBOARD_MODELS, help="comma-separated zoo:NAME or checkpoint folders "
                   "(default: %(default)s)")
    p.add_argument("--n", type=positive_int, default=LEADERBOARD_N, help="test questions per model")
    p.add_argument("--methods", metavar="A,B", help="only these methods (default: every registered one)")
    p.add_argument("--budgets", metavar="F,F", default=LEADERBOARD_BUDGETS, help="prefill-FLOPs ratios every method "
                   "with a keep knob is matched to ('' for none; default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--out", default="docs/leaderboard.md", help="the .md page to write (its plots go beside it, in "
                   "a folder of the page's name; default: %(default)s)")
    p.add_argument("--update", action="store_true", help="keep the sections of the other models already on the "
                   "page (rebuild only those of --models)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("calibrate", help="calibrate a stack's method (ALVTS's selector) on a model; writes a file "
                                         "its params can name", description="Runs the calibration of the stack's "
                       "calibratable stage on the shapes train split (zoo models) or on --data, prints what it "
                       "changed on held-out samples, and writes the result to --out.", epilog=outputs.RULES)
    _add_training_data_arguments(p)
    p.add_argument("--samples", type=positive_int, default=256, help="calibration samples (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=4, help="passes over the samples (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--stage", type=int, help="the stage index, when several stages can be calibrated")
    p.add_argument("--out", "-o", default="selector.safetensors", help=".safetensors file to write (default: "
                   "%(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("fit", help="train a stack's method weights by self-distillation against the model uncompressed",
                       description="Trains only the weights of the stack's methods (the model never changes) so that "
                                   "the compressed model answers like the uncompressed one; writes one weights file "
                                   "per weighted stage, FIT.md and fit.json to --out.", epilog=outputs.RULES)
    _add_training_data_arguments(p)
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=3e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", "-o", default="fitted", help="output folder, created if missing (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from --out's fit-state.pt (refused when there is "
                   "none)")
    p.add_argument("--eval-n", type=non_negative_int, default=200,
                   help="val questions for accuracy before/after (zoo models; 0: skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("flops", help="prefill FLOPs of the unmodified and the compressed model, from a config alone")
    p.add_argument("stack")
    p.add_argument("--config", required=True, help="a transformers config.json (or a folder holding one)")
    p.add_argument("--text-tokens", type=int, required=True, help="prompt tokens that are not image placeholders")
    p.add_argument("--image-size", metavar="HxW", help="image height x width in pixels (LLaVA-NeXT, Qwen2.5-VL)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("viz", help="PNG of the patches each stage keeps",
                       description="One prefill of STACK on the image; writes a PNG with one panel per stage (and per "
                                   "decoder layer with a stage): dropped patches dimmed, the patches of a merged token "
                                   "outlined together, each panel titled with its tokens and the patches they cover.",
                       epilog=outputs.RULES)
    p.add_argument("stack", help="the stack file")
    p.add_argument("--image", required=True, help="the picture (any format PIL reads)")
    p.add_argument("--model", default="zoo:llava-shapes", help="zoo:NAME or a checkpoint folder (default: %(default)s)")
    p.add_argument("--prompt", default="describe", help="the question asked about the image, which "
                   "query-conditioned and decoder stages score against (default: %(default)s)")
    p.add_argument("--output", "-o", default="tokenpress-viz.png", help="the PNG to write (default: %(default)s)")
    p.set_defaults(func=cmd_viz)

    from tokenpress.tools.zoo_options import add_train_arguments

    p = sub.add_parser("zoo", help="the shipped proxy models")
    zoo = p.add_subparsers(dest="zoo_command", required=True)
    t = zoo.add_parser("train", help="train a proxy model from scratch (reproducible from the seed)",
                       epilog=outputs.RULES)
    add_train_arguments(t)
    t.set_defaults(func=cmd_zoo_train)
    c = zoo.add_parser("card", help="measure a trained checkpoint with `tokenpress eval` and rewrite its MODEL_CARD.md",
                       epilog=outputs.RULES)
    c.add_argument("model", help="zoo:NAME or a folder written by `tokenpress zoo train`")
    c.add_argument("--out", "-o", metavar="DIR", help="the folder, created if missing, where eval.json and "
                   "MODEL_CARD.md go (default: the model's folder; required for a shipped zoo model, whose files are "
                   "read-only)")
    c.add_argument("--n", type=positive_int, default=1000, help="test questions")
    c.add_argument("--batch-size", type=positive_int, default=50)
    c.add_argument("--no-measure", action="store_true", help="re-render from the saved eval.json only")
    c.set_defaults(func=cmd_zoo_card)

    from tokenpress.tools import cli_bench

    cli_bench.register(sub)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


#: Functions that add more subcommands (eval, viz, flops, ...) to the parser.
EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage mistake (already said in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except TokenpressError as exc:
        print(f"tokenpress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tokenpress schema | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

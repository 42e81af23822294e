"""``tokenpress leaderboard``: every registered method at 50%, 25% and 11% of the visual tokens on the
shipped proxies, each proxy in one ``tokenpress eval`` run, written as one Markdown page with plots of
accuracy retained against the FLOPs ratio and against the measured prefill-time ratio.

Stacks come from the registry, so a new method appears without a line here: each method's
``params_for_tokens`` gives its setting for a share of an image's tokens (a method without such a
knob runs once, at its own count; settings that coincide run once). Methods with weights use the ones
shipped beside the proxy when they exist for that setting (``weights: zoo``) and run unfitted
otherwise, said in the row. A method a proxy cannot serve is listed with its one-sentence refusal.
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenpress import evaluate
from tokenpress.attach import check_stack, compress, find_adapter
from tokenpress.errors import TokenpressError, UnsupportedModelError
from tokenpress.method import WeightedConfig
from tokenpress.registry import get_registry
from tokenpress.stack import load_stack

RATIOS = (0.5, 0.25, 0.11)
DEFAULT_MODELS = ("zoo:llava-shapes", "zoo:qwen2.5-vl-shapes")
#: The decoder layer of a decoder_layer method that has no default layers (FastV's K = 2).
DECODER_LAYER = 2


@dataclass
class Entry:
    """One stack of the leaderboard: the method, the share it was asked for, how it is set."""

    method: str
    target: float | None  # the share of tokens asked for (None: the method's own count)
    stack: dict[str, Any]
    note: str = ""


@dataclass
class Board:
    """One proxy's results: the rows of its eval run, what each row stands for, and the refusals."""

    model: str
    tokens_per_image: int
    entries: list[Entry]
    rows: list[evaluate.Row]
    refused: list[str] = field(default_factory=list)


def tokens_per_image(model: Any, processor: Any) -> int:
    """Visual tokens one benchmark image becomes on ``model`` (its placeholders in a processed prompt)."""
    from tokenpress.data import shapes
    from tokenpress.loading import process

    sample = shapes.make_sample("test", 0, 0)
    inputs = process(processor, [sample.image], [shapes.build_prompt(sample.question, getattr(
        processor, "image_token", shapes.IMAGE_TOKEN))], what="a benchmark image")
    placeholders = torch.tensor(find_adapter(model).placeholder_ids())
    return int(torch.isin(inputs["input_ids"], placeholders).sum())


def entries_for(model: Any, tokens: int, registry: Any = None) -> tuple[list[Entry], list[str]]:
    """The leaderboard's stacks for ``model`` (an image of ``tokens`` visual tokens), and the refusals."""
    registry = registry or get_registry()
    adapter = find_adapter(model)
    entries, refused = [], []
    for name, method_class in sorted(registry.methods.items()):
        settings: list[tuple[float | None, dict[str, Any]]] = []
        for ratio in sorted(RATIOS):  # the smallest first: a setting two shares give is named by the smaller
            params = method_class.params_for_tokens(tokens, ratio)
            identity = method_class.identity_params
            if params is None or (identity is not None and all(params.get(k) == v for k, v in identity.items())):
                continue
            if all(params != seen for _, seen in settings):
                settings.append((ratio, params))
        if not settings:
            settings = [(None, dict(method_class.example_params))]
        for ratio, params in settings:
            stage: dict[str, Any] = {"method": name, "params": dict(params)}
            if method_class.default_point() == "decoder_layer" and not method_class.has_default_layers():
                stage["layers"] = [DECODER_LAYER]
            label = f"{name} {ratio:.0%}" if ratio is not None else f"{name} (own count)"
            entry = Entry(name, ratio, {"name": label, "stages": [stage]})
            try:
                check_stack(load_stack(entry.stack), adapter)
            except UnsupportedModelError as exc:
                refused.append(f"{name}: {str(exc).split(': ', 2)[-1]}")
                break
            if issubclass(method_class.Config, WeightedConfig):
                entry.note = _with_shipped_weights(model, entry)
            entries.append(entry)
    return entries, refused


def _with_shipped_weights(model: Any, entry: Entry) -> str:
    """Use the weights shipped beside the proxy when they exist for this setting; say which."""
    stage = entry.stack["stages"][0]
    trial = {**entry.stack, "stages": [{**stage, "params": {**stage["params"], "weights": "zoo"}}]}
    try:
        compress(model, trial).detach()
    except TokenpressError:
        entry.stack["name"] += " (unfitted)"
        return "unfitted: no shipped weights for this setting"
    entry.stack = trial
    return "shipped weights"


def run(models: tuple[str, ...] = DEFAULT_MODELS, n: int = 600, batch_size: int = 50,
        progress: bool = True) -> list[Board]:
    """One ``tokenpress eval`` run per proxy over every registered method's stacks."""
    from tokenpress.loading import load_model_and_processor

    boards = []
    for name in models:
        loaded = load_model_and_processor(name, progress=progress)
        tokens = tokens_per_image(*loaded)
        entries, refused = entries_for(loaded[0], tokens)
        rows = evaluate.evaluate([entry.stack for entry in entries], model=name, n=n, batch_size=batch_size,
                                 progress=progress, loaded=loaded)
        boards.append(Board(name, tokens, entries, rows, refused))
    return boards


def _plot(board: Board, path: Path, x: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row.stack: row for row in board.rows}
    methods = sorted({entry.method for entry in board.entries})
    colours = plt.get_cmap("tab20")(range(len(methods)))
    markers = {0.5: "o", 0.25: "s", 0.11: "^", None: "D"}
    figure, axis = plt.subplots(figsize=(7.5, 5), dpi=120)
    for colour, method in zip(colours, methods, strict=True):
        for entry in (e for e in board.entries if e.method == method):
            row = by_name[entry.stack["name"]]
            value = row.flops_ratio if x == "flops" else row.prefill_time_ratio
            axis.scatter(value * 100, row.retention * 100, color=colour, marker=markers[entry.target], s=45,
                         label=method if entry is next(e for e in board.entries if e.method == method) else None)
    axis.scatter([100], [100], color="black", marker="*", s=80, label="baseline")
    axis.set_xlabel("prefill FLOPs (% of baseline)" if x == "flops" else "measured prefill time (% of baseline)")
    axis.set_ylabel("accuracy retained (%)")
    axis.set_title(f"{board.model}: o 50%  s 25%  ^ 11% of the visual tokens")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_page(boards: list[Board], path: str | Path, n: int, command: str) -> list[Path]:
    """The leaderboard page at ``path`` and its plots beside it (in ``leaderboard/``); returns the files."""
    path = Path(path)
    folder = path.parent / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    written = [path]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    lines = ["# Leaderboard", "",
             f"Every registered method at 50%, 25% and 11% of the visual tokens on the shipped proxies, {n} test "
             f"questions each, one `tokenpress eval` run per proxy (so the ratios are against the baseline measured "
             f"in the same run). Rebuilt by `{command}` on {datetime.date.today().isoformat()}, {device}.", "",
             "**retention** is accuracy / the baseline's; **tokens kept** the visual tokens the last decoder layer "
             "holds (a routing method keeps them all); FLOPs are the analytical prefill FLOPs of what ran, time the "
             "median per-batch prefill time ratio. A method faithful to its paper that loses to `random` is shown "
             "as it is.", ""]
    for board in boards:
        slug = board.model.replace("zoo:", "").replace("/", "-")
        lines += [f"## {board.model} ({board.tokens_per_image} visual tokens per image)", "",
                  "| stack | asked | tokens kept | accuracy | retention | FLOPs ratio | prefill time ratio | note |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        notes = {entry.stack["name"]: entry for entry in board.entries}
        ordered = sorted(board.rows[1:], key=lambda row: (-(notes[row.stack].target or 0), -row.accuracy))
        for row in [board.rows[0], *ordered]:
            entry = notes.get(row.stack)
            asked = "-" if entry is None or entry.target is None else f"{entry.target:.0%}"
            lines.append(f"| {row.stack} | {asked} | {row.tokens_kept:.1%} | {row.accuracy:.1%} | {row.retention:.1%} "
                         f"| {row.flops_ratio:.3f} | {row.prefill_time_ratio:.3f} | "
                         f"{'' if entry is None else entry.note} |")
        if board.refused:
            lines += ["", "Refused on this model:", ""] + [f"- {line}" for line in board.refused]
        for x, what in (("flops", "FLOPs ratio"), ("time", "measured prefill time ratio")):
            plot = _plot(board, folder / f"{slug}-{x}.png", x)
            written.append(plot)
            lines += ["", f"![{board.model}: accuracy retained against the {what}]({folder.name}/{plot.name})"]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return written

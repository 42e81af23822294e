"""``tokenpress leaderboard``: every registered method at 50%, 25% and 11% of the visual tokens and at
prefill-FLOPs budgets of 0.5 and 0.3 on the shipped proxies, each proxy in one ``tokenpress eval`` run,
written as one Markdown page with plots of accuracy retained against the FLOPs ratio and against the
measured prefill-time ratio.

Stacks come from the registry, so a new method appears without a line here: each method's
``params_for_tokens`` gives its setting for a share of an image's tokens (a method without such a
knob runs once, at its own count; settings that coincide run once). Methods with weights use the ones
shipped beside the proxy when they exist for that setting (``weights: zoo``) and run unfitted
otherwise, said in the row. A method a proxy cannot serve is listed with its one-sentence refusal.

At a FLOPs budget each method's keep knob is solved on the proxy (:func:`tokenpress.measure.budget.match_flops`,
on the first questions of the test split), so methods that spend their FLOPs differently - before the LLM,
or in its later layers only - are compared at the same cost; the knob chosen is in the row, and a budget a
method cannot reach is said so, never passed off as matched.
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenpress.core.errors import TokenpressError, UnsupportedModelError
from tokenpress.core.method import WeightedConfig
from tokenpress.core.registry import get_registry
from tokenpress.core.stack import load_stack
from tokenpress.data import shapes
from tokenpress.measure import budget as flops_budget
from tokenpress.measure import evaluate
from tokenpress.runtime.attach import check_stack, compress, find_adapter
from tokenpress.runtime.loading import load_model_and_processor, process

RATIOS = (0.5, 0.25, 0.11)
#: The prefill-FLOPs ratios every method with a keep knob is matched to.
BUDGETS = (0.5, 0.3)
DEFAULT_MODELS = ("zoo:llava-shapes", "zoo:qwen2.5-vl-shapes", "zoo:llava-shapes-deep")
#: The decoder layer of a decoder_layer method that has no default layers (FastV's K = 2).
DECODER_LAYER = 2


@dataclass
class Entry:
    """One stack of the leaderboard: the method, the share it was asked for, how it is set."""

    method: str
    target: float | None  # the share of tokens asked for (None: the method's own count or a FLOPs budget)
    stack: dict[str, Any]
    note: str = ""
    budget: float | None = None  # the prefill-FLOPs ratio asked for (a row of the budget table)
    knob: str = ""  # at a budget: the setting chosen, and the FLOPs ratio it reached on the matching batch

    @property
    def marker(self) -> float | str | None:
        """The key of this entry's plot marker (:data:`MARKERS`)."""
        return f"flops {self.budget:g}" if self.budget is not None else self.target


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
    sample = shapes.make_sample("test", 0, 0)
    inputs = process(processor, [sample.image], [shapes.build_prompt(sample.question, getattr(
        processor, "image_token", shapes.IMAGE_TOKEN))], what="a benchmark image")
    placeholders = torch.tensor(find_adapter(model).placeholder_ids())
    return int(torch.isin(inputs["input_ids"], placeholders).sum())


def entries_for(model: Any, tokens: int, registry: Any = None,
                methods: list[str] | None = None) -> tuple[list[Entry], list[str]]:
    """The leaderboard's stacks for ``model`` (an image of ``tokens`` visual tokens) of ``methods`` (default:
    every registered one), and the refusals."""
    registry = registry or get_registry()
    adapter = find_adapter(model)
    entries, refused = [], []
    for name, method_class in sorted(registry.methods.items()):
        if methods is not None and name not in methods:
            continue
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


def budget_entries(model: Any, processor: Any, entries: list[Entry], progress: bool = True,
                   targets: tuple[float, ...] = BUDGETS) -> list[Entry]:
    """A stack per method of ``entries`` with a keep knob and per budget of ``targets``, its knob solved
    on ``model`` so that its prefill FLOPs ratio is the budget (methods without a knob are left out)."""
    from tqdm.auto import tqdm  # a dependency of transformers

    inputs = evaluate.calibration_inputs(processor)
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    num_layers = find_adapter(model).num_layers
    methods = [name for name in dict.fromkeys(entry.method for entry in entries)
               if flops_budget.method_stack(name, 1.0, num_layers) is not None]
    found = []
    for name, target in tqdm([(name, target) for name in methods for target in targets],
                             desc="matching FLOPs budgets", disable=not progress):
        matched = flops_budget.match_flops(model, inputs, name, target)
        knob = matched.knob if matched.matched else f"{matched.knob} (closest reachable: {matched.flops_ratio:.3f})"
        entry = Entry(name, None, {**matched.stack, "name": f"{name} @ FLOPs {target:g}"}, budget=target,
                      knob=knob)
        if issubclass(get_registry().methods[name].Config, WeightedConfig):
            entry.note = _with_shipped_weights(model, entry)
        found.append(entry)
    return found


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


def run(models: tuple[str, ...] = DEFAULT_MODELS, n: int = 600, batch_size: int = 50, progress: bool = True,
        methods: list[str] | None = None, budgets: tuple[float, ...] = BUDGETS) -> list[Board]:
    """One ``tokenpress eval`` run per proxy over the stacks of ``methods`` (default: every registered one)
    at each share of the tokens and each FLOPs budget of ``budgets``."""

    boards = []
    for name in models:
        loaded = load_model_and_processor(name, progress=progress)
        tokens = tokens_per_image(*loaded)
        entries, refused = entries_for(loaded[0], tokens, methods=methods)
        if budgets:
            entries += budget_entries(*loaded, entries, progress=progress, targets=budgets)
        rows = evaluate.evaluate([entry.stack for entry in entries], model=name, n=n, batch_size=batch_size,
                                 progress=progress, loaded=loaded)
        boards.append(Board(name, tokens, entries, rows, refused))
    return boards


#: The plots' marker for each share of the visual tokens asked (None: the method's own count), with
#: the shape it draws (for the caption under a plot) and its legend label.
MARKERS: dict[float | None, tuple[str, str, str]] = {
    0.5: ("o", "●", "50% asked"), 0.25: ("s", "■", "25% asked"), 0.11: ("^", "▲", "11% asked"),
    None: ("D", "◆", "own count"), "flops 0.5": ("P", "✚", "FLOPs 0.5 asked"),
    "flops 0.4": ("v", "▼", "FLOPs 0.4 asked"), "flops 0.3": ("X", "✖", "FLOPs 0.3 asked"),
}
BASELINE_MARKER = ("*", "★", "baseline")


def marker_of(key: float | str | None) -> tuple[str, str, str]:
    """The plot marker of an entry's :attr:`Entry.marker` key (a budget not in :data:`MARKERS`: a hexagon)."""
    return MARKERS.get(key, ("h", "⬢", f"{str(key).replace('flops', 'FLOPs')} asked"))


def _asked(board: Board) -> list[float | str | None]:
    """The marker keys of a board's entries: those of :data:`MARKERS` in its order, then any other."""
    present = {entry.marker for entry in board.entries}
    return [key for key in MARKERS if key in present] + sorted(str(key) for key in present - set(MARKERS))
PLOT_AXES = {"flops": ("prefill FLOPs (% of baseline)", "FLOPs ratio"),
             "time": ("measured prefill time (% of baseline)", "measured prefill time ratio")}


def plot_caption(board: Board) -> str:
    """The line under each of a board's plots: what the colours and the marker shapes stand for."""
    shapes = ", ".join(f"{marker_of(key)[1]} {marker_of(key)[2]}" for key in _asked(board))
    return (f"Colour: the method (legend); shape: what was asked ({shapes}); "
            f"{BASELINE_MARKER[1]} the uncompressed baseline.")


def _plot(board: Board, path: Path, x: str) -> Path:
    import matplotlib  # optional (the plot extra): imported only to plot, checked before any measurement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    by_name = {row.stack: row for row in board.rows}
    methods = sorted({entry.method for entry in board.entries})
    colours = dict(zip(methods, plt.get_cmap("tab20")(range(len(methods))), strict=True))
    figure, axis = plt.subplots(figsize=(9, 5), dpi=120, layout="constrained")  # room for the legends beside
    for entry in board.entries:
        row = by_name[entry.stack["name"]]
        value = row.flops_ratio if x == "flops" else row.prefill_time_ratio
        axis.scatter(value * 100, row.retention * 100, color=colours[entry.method], marker=marker_of(entry.marker)[0],
                     s=45)
    axis.scatter([100], [100], color="black", marker=BASELINE_MARKER[0], s=80)
    label, what = PLOT_AXES[x]
    axis.set_xlabel(label)
    axis.set_ylabel("accuracy retained (%)")
    axis.set_title(f"{board.model}: accuracy retained against the {what}")
    axis.grid(alpha=0.3)
    figure.legend(handles=[Patch(color=colours[method], label=method) for method in methods], title="method",
                  fontsize=7, title_fontsize=8, loc="outside right upper")
    shapes = [Line2D([], [], color="grey", marker=marker_of(key)[0], linestyle="", label=marker_of(key)[2])
              for key in _asked(board)]
    shapes.append(Line2D([], [], color="black", marker=BASELINE_MARKER[0], linestyle="", markersize=9,
                         label=BASELINE_MARKER[2]))
    figure.legend(handles=shapes, title="asked", fontsize=7, title_fontsize=8, loc="outside right lower")
    figure.savefig(path)
    plt.close(figure)
    return path


#: Six columns fit the docs site's page; a row's stack name says the share asked ("tome 25%").
TABLE_HEADER = ["| stack | tokens kept | accuracy | retention | FLOPs ratio | prefill time ratio |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
#: The budget table: the knob each method's search chose and the mean visual tokens per decoder layer,
#: what a FLOPs budget buys.
BUDGET_HEADER = ["| stack | knob chosen | tokens per layer (mean) | accuracy | retention | FLOPs ratio | "
                 "prefill time ratio |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
SUPERSCRIPT_DIGITS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def board_table(board: Board) -> list[str]:
    """One proxy's tables - at a share of the tokens (the baseline, then by share asked and accuracy) and,
    where it has any, at a FLOPs budget (by budget and accuracy) - and, under them, the notes their rows
    point to with a superscript number (kept out of the tables so that they fit the page)."""
    entries = {entry.stack["name"]: entry for entry in board.entries}
    shares = [row for row in board.rows[1:] if entries[row.stack].budget is None]
    at_budget = [row for row in board.rows[1:] if entries[row.stack].budget is not None]
    shares.sort(key=lambda row: (-(entries[row.stack].target or 0), -row.accuracy))
    at_budget.sort(key=lambda row: (-(entries[row.stack].budget or 0), -row.accuracy))
    notes: list[str] = []

    def marked(row: evaluate.Row) -> str:
        entry = entries.get(row.stack)
        if entry is None or not entry.note:
            return row.stack
        if entry.note not in notes:
            notes.append(entry.note)
        return f"{row.stack} " + str(notes.index(entry.note) + 1).translate(SUPERSCRIPT_DIGITS)

    lines = list(TABLE_HEADER)
    for row in [board.rows[0], *shares]:
        lines.append(f"| {marked(row)} | {row.tokens_kept:.1%} | {row.accuracy:.1%} | "
                     f"{row.retention:.1%} | {row.flops_ratio:.3f} | {row.prefill_time_ratio:.3f} |")
    if at_budget:
        lines += ["", "At a prefill-FLOPs budget (each method's knob solved on this proxy's first test questions; "
                  "the FLOPs ratio is the whole run's):", "", *BUDGET_HEADER]
        for row in at_budget:
            knob = entries[row.stack].knob.replace("|", "\\|")
            lines.append(f"| {marked(row)} | {knob} | {row.mean_tokens_per_layer:.1%} | {row.accuracy:.1%} | "
                         f"{row.retention:.1%} | {row.flops_ratio:.3f} | {row.prefill_time_ratio:.3f} |")
    if notes:
        lines.append("")
        lines += [f"- {str(number).translate(SUPERSCRIPT_DIGITS)} {note}" for number, note in enumerate(notes, start=1)]
    return lines


def board_section(board: Board, plots: dict[str, str], measured: str = "") -> list[str]:
    """One proxy's part of the page: its heading, ``measured`` (how and when it was measured), its table and
    notes, its refusals, and its plots (``x`` -> the plot's path relative to the page), each with its caption."""
    lines = [f"## {board.model} ({board.tokens_per_image} visual tokens per image)", ""]
    lines += [measured, ""] if measured else []
    lines += board_table(board)
    if board.refused:
        lines += ["", "Refused on this model:", ""] + [f"- {line}" for line in board.refused]
    for x, link in plots.items():
        lines += ["", f"![{board.model}: accuracy retained against the {PLOT_AXES[x][1]}]({link})", "",
                  plot_caption(board)]
    return lines


#: The page's opening, above the proxies' sections.
PAGE_INTRO = ("# Leaderboard", "",
              "Every registered method at 50%, 25% and 11% of the visual tokens and at prefill-FLOPs budgets on the "
              "shipped proxies, one `tokenpress eval` run per proxy (so the ratios are against the baseline measured "
              "in the same run); each section says the command, the number of test questions, the day and the "
              "machine that measured it.", "",
              "**retention** is accuracy / the baseline's; **tokens kept** the visual tokens the last decoder layer "
              "holds (a routing method keeps them all); FLOPs are the analytical prefill FLOPs of what ran, time the "
              "median per-batch prefill time ratio. A method faithful to its paper that loses to `random` is shown "
              "as it is.", "")


def page_sections(text: str) -> dict[str, str]:
    """The proxies' sections of a leaderboard page, by model name, in page order (each up to the next)."""
    sections: dict[str, str] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].split(" (", 1)[0], [])
        if current is not None:
            current.append(line)
    return {model: "\n".join(lines).rstrip("\n") for model, lines in sections.items()}


def write_page(boards: list[Board], path: str | Path, n: int, command: str, update: bool = False) -> list[Path]:
    """The leaderboard page at ``path`` and its plots beside it (in ``leaderboard/``); returns the files
    written. With ``update`` the sections of the models not in ``boards`` are kept from the page as it is."""
    path = Path(path)
    folder = path.parent / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    written = [path]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    measured = f"Measured by `{command}` on {datetime.date.today().isoformat()}, {device}, {n} test questions."
    sections = page_sections(path.read_text(encoding="utf-8")) if update and path.is_file() else {}
    for board in boards:
        slug = board.model.replace("zoo:", "").replace("/", "-")
        plots = {x: _plot(board, folder / f"{slug}-{x}.png", x) for x in PLOT_AXES}
        written += plots.values()
        links = {x: f"{folder.name}/{plot.name}" for x, plot in plots.items()}
        sections[board.model] = "\n".join(board_section(board, links, measured))
    path.write_text("\n".join([*PAGE_INTRO, "\n\n".join(sections.values()), ""]), encoding="utf-8")
    return written

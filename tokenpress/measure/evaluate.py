"""``tokenpress eval``: the uncompressed model and one or more stacks on the same questions, in one run.

For every batch of the shapes benchmark the baseline and each stack run back to back (so timings
share the machine's state), and each reports accuracy (exact match, per question family), the
visual tokens it kept, the analytical prefill FLOPs and the measured prefill time. Ratios are
always against the baseline measured in the same run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tokenpress.core import flops as flops_model
from tokenpress.core.errors import InputError, TokenpressError
from tokenpress.core.stack import Stack, load_stack
from tokenpress.data import shapes
from tokenpress.measure import budget
from tokenpress.runtime.attach import compress, find_adapter
from tokenpress.runtime.loading import load_model_and_processor, process

DEFAULT_MODEL = "zoo:llava-shapes"


@dataclass
class RunResult:
    """One configuration (the baseline or a stack) over all questions."""

    name: str
    predictions: list[str] = field(default_factory=list)
    visual_in: int = 0
    visual_kept: int = 0
    visual_layer_mean: float = 0.0  # visual tokens each decoder layer processed, averaged over the layers, summed
    flops: float = 0.0
    prefill_seconds: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    per_family: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Truth:
    """What scoring needs of a question: its answer and family (not its image)."""

    answer: str
    family: str


@dataclass
class Row:
    """A line of the comparison table."""

    stack: str
    accuracy: float
    retention: float
    tokens_kept: float  # visual tokens the last decoder layer processed, over the encoder's
    flops_ratio: float
    prefill_time_ratio: float
    per_family: dict[str, float]
    #: Visual tokens a decoder layer processed on average over the layers, over the encoder's: what a
    #: decoder-side method's cost follows (it keeps everything in its first layers).
    mean_tokens_per_layer: float = 1.0
    #: How the stack was made, when the command made it (the knob chosen for a FLOPs budget).
    note: str = ""


def _run_batch(model: Any, inputs: dict[str, torch.Tensor], stack: Stack | None, max_new_tokens: int,
               result: RunResult) -> list[str]:
    with torch.no_grad():
        handle = compress(model, stack) if stack is not None and stack.stages else None
        try:
            start = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            result.prefill_seconds.append(time.perf_counter() - start)
            stats = handle.prefill_stats if handle is not None else None
            records = handle.report().records if handle is not None else None
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            if handle is not None:
                handle.detach()
    if stats is None:
        placeholders = torch.isin(inputs["input_ids"], torch.tensor(_placeholder_ids(model))).sum().item()
        result.visual_in += placeholders
        result.visual_kept += placeholders
        result.visual_layer_mean += placeholders
    else:
        result.visual_in += sum(stats.visual_in)
        result.visual_kept += sum(stats.layer_visual[-1])
        result.visual_layer_mean += sum(sum(layer) for layer in stats.layer_visual) / len(stats.layer_visual)
    result.flops += flops_model.measured(model, inputs, stats, stack, records).total
    return list(output[:, inputs["input_ids"].shape[1]:])


def _placeholder_ids(model: Any) -> list[int]:
    config = model.config
    return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if i is not None]


@dataclass
class Ranks:
    """This process's place in a ``torch.distributed`` run (one rank of one when there is none)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owns_group: bool = False  # this process joined the group, so it must leave it

    @classmethod
    def current(cls) -> Ranks:
        """Join the process group ``torchrun`` / ``accelerate launch`` describe in the environment (gloo on a
        CPU, NCCL on GPUs; one rank per GPU); a single process when there is none."""

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or not dist.is_available():
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        joined = not dist.is_initialized()
        if joined:
            if device != "cpu":
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if device != "cpu" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, joined)

    def close(self, wait: bool = True) -> None:
        """Leave the process group this process joined (after every rank is done with it, unless this
        rank failed and must not wait): a group left alive at interpreter exit can abort the process
        from gloo's threads."""
        if not self.owns_group:
            return

        if wait:
            dist.barrier()
        dist.destroy_process_group()
        self.owns_group = False

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (just ``[value]`` alone)."""
        if self.world == 1:
            return [value]

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


def evaluate(stacks: list[Stack | str | Path], model: str = DEFAULT_MODEL, n: int = 1000, batch_size: int = 50,
             split: str = "test", seed: int = 0, max_new_tokens: int = 2, progress: bool = True,
             loaded: tuple[Any, Any] | None = None, ranks: Ranks | None = None,
             notes: dict[str, str] | None = None) -> list[Row]:
    """Accuracy, retention, tokens kept, FLOPs and prefill-time ratios of each stack vs the baseline
    (``notes``: a note per stack name for the table, e.g. the knob chosen for a FLOPs budget).

    Under ``torchrun``/``accelerate launch`` (``ranks``: default, from the environment) every rank runs
    every ``world``-th batch and the ranks' results are gathered into one table, the same on every rank:
    the accuracy table equals the single-process one exactly (each batch is the batch it would be
    alone, and a sample's answer never depends on its batch).
    """

    if split not in shapes.SPLIT_SIZES:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(shapes.SPLIT_SIZES)}")
    available = shapes.SPLIT_SIZES[split]
    if not 1 <= n <= available:
        raise InputError(f"--n {n}: the {split} split has {available} questions; ask for 1 to {available}")
    parsed = [load_stack(stack) for stack in stacks]
    ranks = ranks or Ranks.current()
    model_obj, processor = loaded or load_model_and_processor(model, progress=progress)
    if ranks.device != "cpu":
        model_obj = model_obj.to(ranks.device)
    configs: list[tuple[str, Stack | None]] = [("baseline", None)] + [(stack.name, stack) for stack in parsed]
    names = [name for name, _ in configs]
    if len(set(names)) != len(names):
        raise TokenpressError(f"stack names must differ from each other and from 'baseline': {names}")
    results = {name: RunResult(name) for name in names}
    image_token = getattr(processor, "image_token", shapes.IMAGE_TOKEN)
    truths: list[Truth] = []  # the samples are made batch by batch: memory does not grow with n
    starts = list(range(0, n, batch_size))[ranks.rank::ranks.world]  # this rank's batches
    bar = tqdm(total=n, desc="eval", unit="question", disable=not progress or ranks.rank != 0)
    for start in starts:
        chunk = [shapes.make_sample(split, index, seed) for index in range(start, min(start + batch_size, n))]
        truths += [Truth(sample.answer, sample.family) for sample in chunk]
        inputs = process(processor, [s.image for s in chunk],
                         [shapes.build_prompt(s.question, image_token) for s in chunk],
                         what=f"{split} questions {start}-{start + len(chunk) - 1}", padding=True)
        inputs = {key: value.to(ranks.device) for key, value in inputs.items()}
        for name, stack in configs:
            tokens = _run_batch(model_obj, inputs, stack, max_new_tokens, results[name])
            results[name].predictions += processor.batch_decode(tokens, skip_special_tokens=True)
        bar.update(len(chunk) * ranks.world)
    bar.close()
    if ranks.world > 1:
        truths, results = _gathered(ranks, starts, batch_size, n, truths, results)

    for result in results.values():
        scored = shapes.score(result.predictions, truths)
        result.accuracy, result.per_family = scored["accuracy"], scored["per_family"]
    base = results["baseline"]
    rows = []
    for name in names:
        result = results[name]
        time_ratio = statistics.median(
            ours / theirs for ours, theirs in zip(result.prefill_seconds, base.prefill_seconds, strict=True))
        rows.append(Row(name, result.accuracy, result.accuracy / base.accuracy if base.accuracy else float("nan"),
                        result.visual_kept / max(result.visual_in, 1), result.flops / base.flops, time_ratio,
                        result.per_family, result.visual_layer_mean / max(result.visual_in, 1),
                        (notes or {}).get(name, "")))
    return rows


def calibration_inputs(processor: Any, split: str = "test", seed: int = 0, count: int = 8) -> dict[str, torch.Tensor]:
    """The first ``count`` questions of ``split`` as one padded batch: what a FLOPs budget is matched on
    (the comparison's own questions, so image layouts and prompt lengths are the ones it runs)."""
    samples = [shapes.make_sample(split, index, seed) for index in range(count)]
    image_token = getattr(processor, "image_token", shapes.IMAGE_TOKEN)
    return process(processor, [s.image for s in samples], [shapes.build_prompt(s.question, image_token)
                                                            for s in samples], what=f"{split} questions", padding=True)


def sweep_stacks(model: Any, processor: Any, methods: list[str], ratios: list[float], budgets: list[float],
                 split: str = "test", seed: int = 0, layer: int | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One stack per method and keep ratio (``ratios``) and per method and FLOPs budget (``budgets``: each
    method's knob solved on the model at hand, :func:`tokenpress.measure.budget.match_flops`), with a note per
    budget stack saying the knob chosen and the FLOPs ratio it reaches; a method without a keep knob is
    noted and skipped."""
    num_layers = find_adapter(model).num_layers
    stacks: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    for method in methods:
        for ratio in ratios:
            stack = budget.method_stack(method, ratio, num_layers, layer)
            if stack is None:
                raise TokenpressError(f"--methods {method}: it has no keep knob (a keep ratio cannot be asked of it)")
            stacks.append(stack)
    if budgets:
        inputs = calibration_inputs(processor, split, seed)
        device = next(model.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        for method in methods:
            for target in budgets:
                matched = budget.match_flops(model, inputs, method, target, layer)
                stack = {**matched.stack, "name": f"{method} @ FLOPs {target:g}"}
                stacks.append(stack)
                verdict = "" if matched.matched else f" (the closest it reaches: {target:g} is out of its range)"
                notes[stack["name"]] = (f"{matched.knob} (from keep ratio {matched.keep_ratio:.3f}): FLOPs ratio "
                                        f"{matched.flops_ratio:.3f} on the calibration batch{verdict}")
    return stacks, notes


def _gathered(ranks: Ranks, starts: list[int], size: int, n: int, truths: list[Truth],
              results: dict[str, RunResult]) -> tuple[list[Truth], dict[str, RunResult]]:
    """Every rank's batches (of ``size`` questions from each start, ``n`` in all) put back in question
    order: predictions and truths by batch, counts and FLOPs summed, each batch's prefill times kept
    (ratios pair every configuration with the baseline of the same batch)."""
    shards = ranks.gather((starts, truths, results))
    merged = {name: RunResult(name) for name in results}
    all_truths: list[Truth] = []
    batches = []  # (first question, rank, the batch's place and offset in that rank's lists)
    for rank, (shard_starts, _, _) in enumerate(shards):
        offset = 0
        for position, start in enumerate(shard_starts):
            batches.append((start, rank, position, offset))
            offset += min(size, n - start)
    for start, rank, position, offset in sorted(batches):
        count = min(size, n - start)
        _, shard_truths, shard_results = shards[rank]
        all_truths += shard_truths[offset:offset + count]
        for name, result in shard_results.items():
            merged[name].predictions += result.predictions[offset:offset + count]
            merged[name].prefill_seconds.append(result.prefill_seconds[position])
    for _, _, shard_results in shards:
        for name, result in shard_results.items():
            merged[name].visual_in += result.visual_in
            merged[name].visual_kept += result.visual_kept
            merged[name].visual_layer_mean += result.visual_layer_mean
            merged[name].flops += result.flops
    return all_truths, merged


def format_table(rows: list[Row]) -> str:
    """The comparison as a Markdown table (tokens kept at the last layer, and per layer on average), the
    knobs chosen for FLOPs budgets under it, then accuracy per question family."""
    lines = ["| stack | accuracy | retention | tokens kept (last layer) | tokens per layer (mean) | FLOPs ratio | "
             "prefill time ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row.stack} | {row.accuracy:.1%} | {row.retention:.1%} | {row.tokens_kept:.1%} | "
                     f"{row.mean_tokens_per_layer:.1%} | {row.flops_ratio:.3f} | {row.prefill_time_ratio:.3f} |")
    noted = [row for row in rows if row.note]
    if noted:
        lines += [""] + [f"- {row.stack}: {row.note}" for row in noted]
    families = sorted({family for row in rows for family in row.per_family})
    lines += ["", "| stack | " + " | ".join(families) + " |", "| --- |" + " ---: |" * len(families)]
    for row in rows:
        lines.append(f"| {row.stack} | " + " | ".join(f"{row.per_family.get(f, float('nan')):.1%}"
                                                       for f in families) + " |")
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(row) for row in rows], indent=2)


CSV_FIELDS = ("stack", "accuracy", "retention", "tokens_kept", "mean_tokens_per_layer", "flops_ratio",
              "prefill_time_ratio", "note")


def rows_to_csv(rows: list[Row]) -> str:
    families = sorted({family for row in rows for family in row.per_family})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(CSV_FIELDS) + [f"accuracy_{f}" for f in families])
    for row in rows:
        writer.writerow([getattr(row, name) for name in CSV_FIELDS] + [row.per_family.get(f, "") for f in families])
    return buffer.getvalue()


def plot_rows(rows: list[Row], path: str | Path, title: str = "", x: str = "tokens") -> Path:
    """Accuracy retention against visual tokens kept (``x="tokens"``) or the prefill FLOPs ratio
    (``x="flops"``), one point per stack (baseline at 100%, 100%)."""
    try:  # matplotlib is optional (the plot extra): imported only to plot
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TokenpressError("--plot needs matplotlib: pip install 'tokenpress[plot]'") from None
    figure, axis = plt.subplots(figsize=(6, 4.5), dpi=120)
    if x not in ("tokens", "flops"):
        raise ValueError(f"x must be 'tokens' or 'flops', got {x!r}")
    for row in rows:
        where = (row.tokens_kept if x == "tokens" else row.flops_ratio) * 100, row.retention * 100
        axis.scatter(*where, s=40)
        axis.annotate(row.stack, where, textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.set_xlabel("visual tokens kept at the last layer (%)" if x == "tokens" else "prefill FLOPs (% of baseline)")
    axis.set_ylabel("accuracy retention (%)")
    axis.set_xlim(0, 105)
    axis.grid(alpha=0.3)
    axis.set_title(title or "accuracy retention vs tokens kept")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path

"""``tokenpress bench`` and ``tokenpress profile``: speed, FLOPs and memory of stacks against the
uncompressed model, measured in the same run.

The benchmark interleaves the configurations (baseline, stack 1, stack 2, ..., baseline, ...) for
every repeat and reports medians, so drifts in machine speed hit all of them alike; a speedup is the
median of each round's baseline time over the same round's time, with half its interquartile range
(``±``) as the noise this machine put on it. It is a
benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function, tensorboard_trace_handler
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageTextToText

from tokenpress.core import flops as flops_model
from tokenpress.core.errors import TokenpressError
from tokenpress.core.registry import get_registry
from tokenpress.core.stack import Stack, load_stack
from tokenpress.data import shapes
from tokenpress.families.testbed import Prompt, record_of
from tokenpress.measure.profiling import peak_memory, stage_flops, stage_timer, timed
from tokenpress.runtime.attach import compress, find_adapter


@dataclass
class BenchRow:
    """One configuration against the baseline of the same run."""

    stack: str
    tokens_kept: float
    prefill_ms: float
    speedup: float
    flops_speedup: float
    efficiency: float  # measured speedup / FLOPs-implied speedup (1.0 = at the limit)
    overhead: float  # the stages' own time / the prefill time they save
    peak_memory_mb: float
    accuracy_retention: float | None = None
    #: half the interquartile range of the per-round speedups: how far this machine's noise moves it
    speedup_spread: float = 0.0


#: The bench row of the model with an empty stack attached (interception only).
ATTACHED_EMPTY = "attached, empty stack"


def sweep_stacks(methods: list[str], ratios: list[float], decoder_layer: int | None = None) -> list[Stack]:
    """One stack per method x keep ratio, from each method's ``params_for_keep``.

    Decoder-layer stages run at ``decoder_layer``; when it is None, at the method's default layers
    if it has them (ALVTS: every layer), else at layer 2 (FastV's K).
    """

    registry = get_registry()
    stacks = []
    for name in methods:
        if name not in registry.methods:
            raise TokenpressError(f"unknown method {name!r}; known: {', '.join(sorted(registry.methods))}")
        method_class = registry.methods[name]
        for ratio in ratios:
            params = method_class.params_for_keep(ratio)
            if params is None:
                raise TokenpressError(f"method {name!r} has no keep-ratio setting to sweep")
            identity = method_class.identity_params
            if identity is not None and all(params.get(key) == value for key, value in identity.items()):
                continue  # e.g. pool cannot keep 50% with a square kernel: kernel 1 would change nothing
            stage: dict[str, Any] = {"method": name, "params": params}
            explicit = decoder_layer is not None or not method_class.has_default_layers()
            if method_class.default_point() == "decoder_layer" and explicit:
                stage["layers"] = [2 if decoder_layer is None else decoder_layer]
            label = ",".join(f"{key}={value}" for key, value in params.items() if key != "seed")
            stacks.append(load_stack({"name": f"{name}({label})", "stages": [stage]}))
    return stacks


def model_from_config(path: str | Path, dtype: str = "float32", attn: str = "sdpa") -> Any:
    """A random-weight model of a config.json's shape (e.g. LLaVA-1.5-7B dimensions), no download."""

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = attn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def synthetic_inputs(model: Any, batch_size: int, text_tokens: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random prompts around one image each, random pixels, made by the tiny-model record of
    the model's family (``ModelAdapter.test_family``): what ``--config`` benchmarks run."""
    record = record_of(type(find_adapter(model)))
    if record is None:
        raise TokenpressError(f"the {find_adapter(model).family} family names no test record to make synthetic "
                              "inputs with; pass a checkpoint with a processor (--model)")
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    image_token = model.config.image_token_id
    prompts = []
    for _ in range(batch_size):
        ids = torch.randint(3, min(vocab, image_token if image_token > 3 else vocab), (text_tokens,),
                            generator=generator).tolist()
        prompts.append(Prompt([1] + ids[: text_tokens // 4], ids[text_tokens // 4:]))
    batch = record.batch(model, prompts, "left", seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def checkpoint_inputs(processor: Any, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of shapes-benchmark questions through the checkpoint's own processor."""

    samples = shapes.generate_split("val", batch_size, seed=seed)
    image_token = getattr(processor, "image_token", shapes.IMAGE_TOKEN)
    return processor(images=[s.image for s in samples],
                     text=[shapes.build_prompt(s.question, image_token) for s in samples],
                     padding=True, return_tensors="pt")


def _prefill(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return model(**inputs, use_cache=False, logits_to_keep=1)


def bench(model: Any, inputs: dict[str, torch.Tensor], stacks: list[Stack], repeats: int = 5,
          progress: bool = True) -> list[BenchRow]:
    """Interleaved prefill timings, FLOPs and peak memory of each stack against the baseline."""

    # "attached, empty stack": the interception alone (what tokenpress costs before any method runs)
    empty = load_stack({"name": ATTACHED_EMPTY, "stages": []})
    configs: list[tuple[str, Stack | None]] = [("baseline", None), (ATTACHED_EMPTY, empty)] + [
        (s.name, s) for s in stacks]
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    stage_time: dict[str, list[float]] = {name: [] for name, _ in configs}
    flops: dict[str, float] = {}
    kept: dict[str, float] = {}
    memory: dict[str, int] = {}
    total = (repeats + 1) * len(configs)
    with tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar, stage_timer() as timer:
        for repeat in range(repeats + 1):  # the first round warms up and measures FLOPs and memory
            for name, stack in configs:
                handle = compress(model, stack) if stack is not None else None
                try:
                    timer.timing.seconds.clear()
                    seconds = timed(lambda: _prefill(model, inputs))
                    if repeat == 0:
                        memory[name] = peak_memory(lambda: _prefill(model, inputs))
                        stats = handle.prefill_stats if handle is not None else None
                        records = handle.report().records if handle is not None else None
                        flops[name] = flops_model.measured(model, inputs, stats, stack, records).total
                        kept[name] = 1.0 if stats is None else (
                            sum(stats.layer_visual[-1]) / max(sum(stats.visual_in), 1))
                    else:
                        times[name].append(seconds)
                        stage_time[name].append(timer.timing.total)
                finally:
                    if handle is not None:
                        handle.detach()
                bar.update()
    base = statistics.median(times["baseline"])
    rows = []
    for name, _ in configs:
        median = statistics.median(times[name])
        # each round's baseline against the same round's run: drifts slower than a round cancel out
        ratios = [b / t for b, t in zip(times["baseline"], times[name], strict=True)]
        speedup = statistics.median(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [speedup, speedup, speedup]
        flops_speedup = flops["baseline"] / flops[name]
        saved = base - median
        overhead = statistics.median(stage_time[name]) / saved if saved > 0 else float("nan")
        rows.append(BenchRow(name, kept[name], median * 1000, speedup, flops_speedup, speedup / flops_speedup,
                             overhead if name != "baseline" else 0.0, memory[name] / 2**20,
                             speedup_spread=(quartiles[2] - quartiles[0]) / 2))
    return rows


def format_bench(rows: list[BenchRow], device: str) -> str:
    """A Markdown table of the benchmark, with the device named."""
    lines = [f"device: {device}", "",
             "| stack | tokens kept | prefill ms | speedup | FLOPs speedup | efficiency | overhead | "
             "peak MiB | accuracy retention |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        retention = "n/a" if row.accuracy_retention is None else f"{row.accuracy_retention:.1%}"
        overhead = "-" if row.stack == "baseline" else (
            "n/a" if row.overhead != row.overhead else f"{row.overhead:.1%}")
        spread = f" ±{row.speedup_spread:.2f}" if row.stack != "baseline" else ""
        lines.append(f"| {row.stack} | {row.tokens_kept:.1%} | {row.prefill_ms:.1f} | {row.speedup:.2f}x{spread} | "
                     f"{row.flops_speedup:.2f}x | {row.efficiency:.2f} | {overhead} | {row.peak_memory_mb:.1f} | "
                     f"{retention} |")
    return "\n".join(lines)


def plot_bench(rows: list[BenchRow], path: str | Path) -> Path:
    """Measured and FLOPs-implied speedup against tokens kept, one series per method."""
    try:  # matplotlib is optional (the plot extra): imported only to plot
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TokenpressError("--plot needs matplotlib: pip install 'tokenpress[plot]'") from None
    figure, axis = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    methods: dict[str, list[BenchRow]] = {}
    for row in rows[1:]:
        methods.setdefault(row.stack.split("(")[0], []).append(row)
    for method, points in methods.items():
        points.sort(key=lambda r: r.tokens_kept)
        line = axis.plot([p.tokens_kept * 100 for p in points], [p.speedup for p in points], marker="o",
                         label=f"{method} measured")[0]
        axis.plot([p.tokens_kept * 100 for p in points], [p.flops_speedup for p in points], linestyle="--",
                  color=line.get_color(), label=f"{method} FLOPs-implied")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("visual tokens kept at the last layer (%)")
    axis.set_ylabel("prefill speedup vs uncompressed (x)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def rows_as_dicts(rows: list[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]


@dataclass
class ProfileRow:
    stage: str
    tokens_in: str
    tokens_out: str
    milliseconds: float
    share_of_prefill: float
    flops: float


def profile(model: Any, inputs: dict[str, torch.Tensor], stack: Stack, trace_dir: str | None = None,
            max_new_tokens: int = 8) -> tuple[list[ProfileRow], dict[str, float], Any]:
    """A torch.profiler run of one prefill and a short generation with ``stack`` attached.

    Returns the per-stage rows, totals (prefill/generate milliseconds, peak memory, FLOPs) and the
    profiler object (its ``key_averages()`` table). ``trace_dir`` receives a trace that TensorBoard's
    profiler plugin (torch-tb-profiler) opens.
    """

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    handler = tensorboard_trace_handler(trace_dir) if trace_dir else None
    with compress(model, stack) as handle:
        _prefill(model, inputs)  # warm-up
        with stage_flops() as counter:
            _prefill(model, inputs)
        total_flops = counter.total_prefill
        with stage_timer() as timer, torch.profiler.profile(activities=activities, record_shapes=True,
                                                            profile_memory=True, on_trace_ready=handler) as prof:
            with record_function("tokenpress:prefill"):
                prefill_seconds = timed(lambda: _prefill(model, inputs))
            stage_seconds = dict(timer.timing.seconds)
            with record_function("tokenpress:generate"), torch.no_grad():
                generate_seconds = timed(lambda: model.generate(**inputs, max_new_tokens=max_new_tokens,
                                                                do_sample=False))
        memory = peak_memory(lambda: _prefill(model, inputs))
        records = {r.stage + (f" layer {r.layer}" if r.layer is not None else ""): r for r in handle.report().records}
    rows = []
    for label, seconds in stage_seconds.items():
        record = records.get(label)
        rows.append(ProfileRow(label, _fmt(record.tokens_in) if record else "?",
                               _fmt(record.tokens_out) if record else "?", seconds * 1000,
                               seconds / prefill_seconds, counter.flops.get(label, 0.0)))
    totals = {"prefill_ms": prefill_seconds * 1000, "generate_ms": generate_seconds * 1000,
              "max_new_tokens": max_new_tokens, "peak_memory_mb": memory / 2**20, "prefill_flops": total_flops}
    return rows, totals, prof


def _fmt(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def format_profile(rows: list[ProfileRow], totals: dict[str, float], device: str) -> str:
    lines = [f"device: {device}",
             f"prefill {totals['prefill_ms']:.1f} ms ({totals['prefill_flops'] / 1e9:.3f} GFLOP), "
             f"generate {int(totals['max_new_tokens'])} tokens {totals['generate_ms']:.1f} ms, "
             f"peak extra memory {totals['peak_memory_mb']:.1f} MiB", "",
             "| stage | tokens in | tokens out | ms | share of prefill | FLOPs |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row.stage} | {row.tokens_in} | {row.tokens_out} | {row.milliseconds:.2f} | "
                     f"{row.share_of_prefill:.1%} | {row.flops:.3g} |")
    return "\n".join(lines)

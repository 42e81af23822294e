"""eval, viz, bench and profile on a tiny checkpoint: they run, and their outputs have their schema."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokenpress
from tokenpress.data import shapes
from tokenpress.measure import evaluate
from tokenpress.measure.bench import bench, profile, sweep_stacks, synthetic_inputs
from tokenpress.testing import tiny_llava

STACKS = ["stacks/fastv.yaml", "stacks/pool.yaml"]


@pytest.fixture(scope="module")
def eval_rows(checkpoint):
    return evaluate.evaluate(STACKS, model=str(checkpoint), n=10, batch_size=5, progress=False)


def test_eval_compares_every_stack_with_the_baseline(eval_rows):
    assert [row.stack for row in eval_rows] == ["baseline", "fastv-k2-r50", "pool-2x2"]
    baseline, fastv, pool = eval_rows
    assert (baseline.flops_ratio, baseline.tokens_kept, baseline.prefill_time_ratio) == (1.0, 1.0, 1.0)
    assert fastv.tokens_kept == pytest.approx(0.5) and pool.tokens_kept == pytest.approx(0.25)
    assert 0 < pool.flops_ratio < fastv.flops_ratio < 1
    families = set(baseline.per_family)
    assert families == set(shapes.FAMILIES)


def test_eval_json_and_csv_schema(eval_rows):
    rows = json.loads(evaluate.rows_to_json(eval_rows))
    assert [set(row) for row in rows] == [{"stack", "accuracy", "retention", "tokens_kept", "flops_ratio",
                                           "prefill_time_ratio", "per_family", "mean_tokens_per_layer",
                                           "note"}] * 3
    table = list(csv.DictReader(io.StringIO(evaluate.rows_to_csv(eval_rows))))
    assert [row["stack"] for row in table] == ["baseline", "fastv-k2-r50", "pool-2x2"]
    assert set(evaluate.CSV_FIELDS) <= set(table[0])
    assert float(table[2]["tokens_kept"]) == pytest.approx(0.25)
    markdown = evaluate.format_table(eval_rows)
    assert markdown.splitlines()[0].startswith("| stack | accuracy | retention |")


def test_eval_plot_is_a_png(eval_rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = evaluate.plot_rows(eval_rows, tmp_path / "plot.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100


def test_viz_writes_a_png_with_one_panel_per_step(checkpoint, tmp_path):
    from tokenpress.tools.viz import MERGE_COLOUR, PANEL, visualize

    picture = tmp_path / "in.png"
    Image.new("RGB", (48, 48), "red").save(picture)
    out = visualize("stacks/pool-then-fastv.yaml", picture, tmp_path / "viz.png", model=str(checkpoint),
                    prompt="w5 w6")
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width == 3 * PANEL  # encoder, pool, layer 2
        pixels = np.asarray(image.convert("RGB"))
    outlined = (pixels == MERGE_COLOUR).all(-1)
    # the encoder's patches are single tokens; pool merges them, so its panel outlines groups
    assert not outlined[:, :PANEL].any() and outlined[:, PANEL:2 * PANEL].any()


def test_patch_owner_and_merge_outlines():
    """Which token stands for each patch (-1: dropped), and the edges drawn around merged tokens."""
    from tokenpress.core.tokens import patch_owner
    from tokenpress.tools.viz import merge_edges

    # one image, 3 tokens over 4 patches: token 0 = patches {0, 1}, token 2 = {3}, patch 2 dropped
    source = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    assert patch_owner(source).tolist() == [[0, 0, -1, 2]]
    assert patch_owner(source, torch.tensor([[False, True, True]])).tolist() == [[-1, -1, -1, 2]]

    assert merge_edges(torch.arange(16), (4, 4)) == []  # one token per patch: nothing outlined
    blocks = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])  # 2x2 pooling of a 4x4 grid
    assert sorted(merge_edges(blocks, (4, 4))) == sorted(
        [(r, 1, "right") for r in range(4)] + [(1, c, "down") for c in range(4)])
    # a merged token next to a dropped patch is outlined on that side too
    assert merge_edges(torch.tensor([0, 0, -1, 3]), (2, 2)) == [(0, 0, "down"), (0, 1, "down")]


def test_cli_eval_json_to_stdout(checkpoint, capsys):
    from tokenpress.tools.cli import main

    assert main(["eval", "stacks/random.yaml", "--model", str(checkpoint), "--n", "5", "--batch-size", "5",
                 "--quiet", "--json", "-"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert [row["stack"] for row in rows] == ["baseline", "random-25"]


@torch.no_grad()
def test_bench_reports_every_configuration_against_the_baseline():
    model = tiny_llava("sdpa")
    inputs = synthetic_inputs(model, batch_size=2, text_tokens=16)
    rows = bench(model, inputs, sweep_stacks(["fastv", "pool"], [0.25]), repeats=3, progress=False)
    assert [row.stack for row in rows] == ["baseline", "attached, empty stack", "fastv(keep_ratio=0.25)",
                                           "pool(kernel=2,mode=avg)"]
    assert rows[0].speedup == 1.0 and rows[0].flops_speedup == 1.0 and rows[0].speedup_spread == 0.0
    assert all(row.speedup_spread >= 0 for row in rows)
    assert rows[1].flops_speedup == 1.0 and rows[1].tokens_kept == 1.0  # interception only: nothing compressed
    assert rows[2].flops_speedup > 1 and rows[3].flops_speedup > rows[2].flops_speedup
    assert all(row.peak_memory_mb > 0 and row.prefill_ms > 0 for row in rows)


@torch.no_grad()
def test_profile_times_each_stage_and_writes_a_trace(tmp_path):
    model = tiny_llava("sdpa")
    inputs = synthetic_inputs(model, batch_size=2, text_tokens=16)
    rows, totals, _ = profile(model, inputs, tokenpress.load_stack("stacks/pool-then-fastv.yaml"),
                              trace_dir=str(tmp_path), max_new_tokens=2)
    assert [row.stage for row in rows] == ["0:pool(post_encoder)", "1:fastv(decoder_layer@2) layer 2"]
    assert [(row.tokens_in, row.tokens_out) for row in rows] == [("36", "9"), ("9", "4")]  # round(4.5) = 4
    assert rows[1].flops > 0 and totals["prefill_flops"] > 0
    traces = list(tmp_path.glob("*.pt.trace.json"))
    assert traces and "traceEvents" in json.loads(traces[0].read_text())


def test_cli_bench_and_profile_from_a_config(tmp_path, capsys):
    from tokenpress.tools.cli import main

    config = tmp_path / "config.json"
    tiny_llava().config.to_json_file(config)
    assert main(["bench", "--config", str(config), "--methods", "fastv,random", "--ratios", "0.25", "--repeats", "1",
                 "--batch-size", "2", "--text-tokens", "16", "--quiet", "--markdown", str(tmp_path / "b.md")]) == 0
    table = (tmp_path / "b.md").read_text()
    assert table.startswith("device: CPU") or table.startswith("device: ")
    assert "| fastv(keep_ratio=0.25) |" in table and "| random(keep_ratio=0.25) |" in table
    assert main(["profile", "stacks/fastv.yaml", "--config", str(config), "--batch-size", "2", "--text-tokens", "16",
                 "--max-new-tokens", "2", "--trace", str(tmp_path / "trace")]) == 0
    out = capsys.readouterr().out
    assert "0:fastv(decoder_layer@2) layer 2 | 36 | 18 |" in out
    assert list((tmp_path / "trace").glob("*.json"))

"""``tokenpress leaderboard``: every registered method appears (run, or refused in one sentence), and the
page it writes holds the tables and both plots."""

from __future__ import annotations

import tokenpress
from tokenpress.measure import leaderboard
from tokenpress.runtime.loading import load_model_and_processor
from tokenpress.tools.cli import main


def test_every_registered_method_runs_or_is_refused_on_each_family(checkpoint):
    model, processor = load_model_and_processor(str(checkpoint))
    tokens = leaderboard.tokens_per_image(model, processor)
    assert tokens == 36  # the tiny LLaVA: a 6x6 patch grid
    entries, refused = leaderboard.entries_for(model, tokens)
    names = [entry.stack["name"] for entry in entries]
    assert len(set(names)) == len(names)
    covered = {entry.method for entry in entries} | {line.split(":")[0] for line in refused}
    assert covered == set(tokenpress.get_registry().methods)
    by_name = {entry.stack["name"]: entry for entry in entries}
    assert by_name["pool 11%"].stack["stages"][0]["params"]["kernel"] == 3  # a setting named by the smallest share
    assert "pool 50%" not in by_name  # kernel 1 would change nothing
    assert by_name["fastv 25%"].stack["stages"][0]["layers"] == [leaderboard.DECODER_LAYER]
    assert by_name["qformer 25% (unfitted)"].note.startswith("unfitted")  # no weights ship for this test model


def test_the_command_writes_the_page_and_its_plots(checkpoint, tmp_path, capsys):
    out = tmp_path / "board.md"
    assert main(["leaderboard", "--models", str(checkpoint), "--n", "2", "--batch-size", "2", "--out", str(out),
                 "--quiet"]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("# Leaderboard") and "| baseline | " in page
    assert "| tome 25% | " in page and "| cdpruner 11% | " in page
    plots = sorted(path.name for path in (tmp_path / "board").iterdir())
    assert len(plots) == 2 and all(path.endswith(".png") for path in plots)
    assert all(f"board/{name}" in page for name in plots)
    assert f"wrote {out}" in capsys.readouterr().out

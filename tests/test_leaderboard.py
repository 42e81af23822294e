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
    assert "layers" not in by_name["fastv 25%"].stack["stages"][0]  # its own layer, scaled to the depth
    assert by_name["qformer 25% (unfitted)"].note.startswith("unfitted")  # no weights ship for this test model


def test_the_command_writes_the_page_and_its_plots(checkpoint, tmp_path, capsys):
    out = tmp_path / "board.md"
    assert main(["leaderboard", "--models", str(checkpoint), "--n", "2", "--batch-size", "2", "--out", str(out),
                 "--methods", "tome,cdpruner,fastv,prumerge", "--budgets", "0.5", "--quiet"]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("# Leaderboard") and "| baseline | " in page
    assert "| tome 25% | " in page and "| cdpruner 11% | " in page and "| pool " not in page
    measured = next(line for line in page.splitlines() if line.startswith("Measured by `tokenpress leaderboard "))
    assert f"--models {checkpoint} --n 2 --methods tome,cdpruner,fastv,prumerge --budgets 0.5` on " in measured
    assert measured.endswith(", 2 test questions.")
    # at the budget: each method with a keep knob, its knob, and the FLOPs ratio the run reached
    budget_rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in page.splitlines() if "@ FLOPs" in line}
    assert set(budget_rows) == {"tome @ FLOPs 0.5", "cdpruner @ FLOPs 0.5", "fastv @ FLOPs 0.5"}
    assert budget_rows["cdpruner @ FLOPs 0.5"][1].startswith("keep_ratio=")
    assert abs(float(budget_rows["cdpruner @ FLOPs 0.5"][5]) - 0.5) <= 0.02
    # the tiny encoder lets ToMe merge at most half of the tokens: the budget is out of its reach, and said so
    assert "(closest reachable: " in budget_rows["tome @ FLOPs 0.5"][1]
    plots = sorted(path.name for path in (tmp_path / "board").iterdir())
    assert len(plots) == 2 and all(path.endswith(".png") for path in plots)
    assert all(f"board/{name}" in page for name in plots)
    assert f"wrote {out}" in capsys.readouterr().out

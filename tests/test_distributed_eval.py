"""``tokenpress eval`` on torch.distributed: two gloo ranks under torchrun give exactly the accuracy
table of one process (every field but the measured time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tokenpress.cli import main

STACKS = ["stacks/random.yaml", "stacks/pool-then-fastv.yaml"]


def test_torchrun_two_ranks_equal_one_process(tmp_path, capsys):
    # the shipped proxy (real answers, so accuracies are not all zero): 4 batches, the last one short
    common = ["--model", "zoo:llava-shapes", "--n", "23", "--batch-size", "6", "--quiet"]
    assert main(["eval", *STACKS, *common, "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "tokenpress", "--", "eval", *STACKS, *common, "--json",
                           str(tmp_path / "two.json")], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("questions of the test split (seed 0), 2 ranks") == 1  # rank 0 alone speaks
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    for row in one + two:
        row.pop("prefill_time_ratio")
    assert one == two
    assert 0 < min(row["accuracy"] for row in one) < max(row["accuracy"] for row in one)

"""``tokenpress eval`` on torch.distributed: two gloo ranks launched by ``torchrun`` or by ``accelerate
launch`` give exactly the accuracy table of one process (every field but the measured time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokenpress.tools.cli import main

STACKS = ["stacks/random.yaml", "stacks/pool-then-fastv.yaml"]
# the shipped proxy (real answers, so accuracies are not all zero): 4 batches, the last one short
COMMON = ["--model", "zoo:llava-shapes", "-n", "23", "--batch-size", "6", "--quiet"]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # on a machine without GPUs accelerate's multi-GPU launcher starts CPU ranks, which join over gloo
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("one") / "one.json"
    assert main(["eval", *STACKS, *COMMON, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_ranks_equal_one_process(launcher, one_process, tmp_path, capsys):
    capsys.readouterr()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*LAUNCHERS[launcher], "-m", "tokenpress", "eval", *STACKS, *COMMON, "--json", str(tmp_path / "two.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("questions of the test split (seed 0), 2 ranks") == 1  # rank 0 alone speaks
    one, two = one_process, json.loads((tmp_path / "two.json").read_text())
    for row in one + two:
        row.pop("prefill_time_ratio", None)
    assert one == two
    assert 0 < min(row["accuracy"] for row in one) < max(row["accuracy"] for row in one)

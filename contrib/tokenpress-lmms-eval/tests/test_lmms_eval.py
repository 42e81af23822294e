"""lmms-eval, run as a user runs it, scores the local shapes task on the ``tokenpress`` model exactly as
``tokenpress eval`` scores the same questions: same accuracy, overall and per question family, with and
without a stack, on both shipped proxy models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tokenpress.core.errors import InputError
from tokenpress.data import shapes
from tokenpress.measure import evaluate
from tokenpress_lmms_eval.shapes_task import DATA_FILE, METRICS, TASK_FILE, TASK_NAME, main

REPO = Path(__file__).resolve().parents[3]
N = 50  # questions: every family 10 times; a few seconds of generation per run on 2 cores


@pytest.fixture(scope="session")
def task_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task written by its command: the first ``N`` test questions."""
    folder = tmp_path_factory.mktemp("task")
    assert main(["--out", str(folder), "--n", str(N)]) == 0
    return folder


def tokenpress_eval_scores(model: str, stack: str) -> dict[str, dict[str, float]]:
    """What ``tokenpress eval STACK --model MODEL --n N`` reports (the function it runs, with its defaults):
    accuracy and per-family accuracies of the baseline and of the stack, by row name."""
    rows = evaluate.evaluate([REPO / stack], model=model, n=N, progress=False)
    return {row.stack: {"accuracy": row.accuracy, **row.per_family} for row in rows}


def lmms_eval_command_scores(task_folder: Path, model_args: str, tmp: Path) -> dict[str, float]:
    """``python -m lmms_eval --model tokenpress ...`` on the task, offline: its value of every metric of the task."""
    out = tmp / "lmms-eval"
    command = [sys.executable, "-m", "lmms_eval", "--model", "tokenpress", "--model_args", model_args,
               "--tasks", TASK_NAME, "--include_path", str(task_folder), "--batch_size", "50",
               "--output_path", str(out)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "HF_DATASETS_CACHE": str(tmp / "cache")}  # a cache of its own: never an older data file's
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (results,) = out.rglob("*_results.json")
    scores = json.loads(results.read_text())["results"][TASK_NAME]
    return {metric: scores[f"{metric},none"] for metric in METRICS}


def test_lmms_eval_command_reports_tokenpress_eval_accuracy(task_folder: Path, tmp_path: Path) -> None:
    """zoo:llava-shapes through lmms-eval's command line, uncompressed and with FastV."""
    expected = tokenpress_eval_scores("zoo:llava-shapes", "stacks/fastv.yaml")
    uncompressed = lmms_eval_command_scores(task_folder, "pretrained=zoo:llava-shapes", tmp_path / "baseline")
    compressed = lmms_eval_command_scores(task_folder, f"pretrained=zoo:llava-shapes,stack={REPO}/stacks/fastv.yaml",
                                          tmp_path / "fastv")
    assert uncompressed == expected["baseline"]
    assert compressed == expected["fastv-k2-r50"]
    assert compressed["accuracy"] < uncompressed["accuracy"]  # the stack was attached: it costs accuracy here


def test_lmms_eval_python_entry_point_reports_tokenpress_eval_accuracy(task_folder: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """zoo:qwen2.5-vl-shapes through lmms-eval's Python entry point, uncompressed and with random-25."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = tokenpress_eval_scores("zoo:qwen2.5-vl-shapes", "stacks/random.yaml")
    scores = {}
    tasks = TaskManager(include_path=str(task_folder))
    for name, stack in (("baseline", "none"), ("random-25", f"{REPO}/stacks/random.yaml")):
        results = simple_evaluate(model="tokenpress", model_args=f"pretrained=zoo:qwen2.5-vl-shapes,stack={stack}",
                                  tasks=[TASK_NAME], batch_size=50, task_manager=tasks)
        scores[name] = {metric: results["results"][TASK_NAME][f"{metric},none"] for metric in METRICS}
    assert scores == expected
    assert scores["random-25"]["accuracy"] < scores["baseline"]["accuracy"]


def test_task_data_are_the_benchmark_questions(task_folder: Path) -> None:
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(task_folder / DATA_FILE), split="train",
                                 cache_dir=str(task_folder / "cache"))
    assert len(rows) == N
    for index, row in enumerate(rows):
        sample = shapes.make_sample("test", index)
        assert (row["index"], row["question"], row["answer"], row["family"]) == \
               (index, sample.question, sample.answer, sample.family)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(sample.image))


def test_task_has_a_metric_per_family(task_folder: Path) -> None:
    class TaskLoader(yaml.SafeLoader):
        """Reads lmms-eval's ``!function`` tags as the names they give."""

    TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((task_folder / TASK_FILE).read_text(), Loader=TaskLoader)
    assert tuple(metric["metric"] for metric in config["metric_list"]) == METRICS == ("accuracy", *shapes.FAMILIES)


def test_the_model_is_registered_with_lmms_eval() -> None:
    from lmms_eval.models import get_model

    from tokenpress_lmms_eval.model import TokenpressModel

    assert get_model("tokenpress") is TokenpressModel


def test_model_arguments_win_over_lmms_eval_options() -> None:
    from tokenpress_lmms_eval.model import TokenpressModel

    model = TokenpressModel.create_from_arg_string("pretrained=zoo:llava-shapes,batch_size=7",
                                                   {"batch_size": "1", "max_batch_size": None, "device": None})
    assert (model.batch_size, str(model.device), model.stack) == (7, "cpu", None)
    with pytest.raises(NotImplementedError, match="only generates"):
        model.loglikelihood([])


@pytest.mark.parametrize(("arguments", "message"), [
    ("pretrained=zoo:llava-shapes,stak=stacks/fastv.yaml", "unknown tokenpress model argument"),
    ("batch_size=auto", "batch_size='auto': expected a positive integer"),
    ("prompt=fancy", "expected one of plain, chat"),
    ("pretrained=zoo:nothing-here", "zoo:nothing-here"),
])
def test_bad_model_arguments_are_one_sentence(arguments: str, message: str) -> None:
    from tokenpress_lmms_eval.model import TokenpressModel

    with pytest.raises(InputError, match=message) as error:
        TokenpressModel.create_from_arg_string(arguments, {})
    assert "\n" not in str(error.value)


def test_the_task_command_refuses_too_many_questions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--n", "1001"]) == 2
    assert capsys.readouterr().err.strip() == ("tokenpress-lmms-shapes: --n 1001: the test split has 1000 "
                                               "questions; ask for 1 to 1000")


def test_prompts_place_the_image_token_once() -> None:
    from tokenpress_lmms_eval.model import TokenpressModel

    plain = TokenpressModel(pretrained="zoo:llava-shapes")
    chat = TokenpressModel(pretrained="zoo:llava-shapes", prompt="chat")
    question = "what color is at 1 2 ?"
    assert plain._prompt(question, 1, "doc") == shapes.build_prompt(question) == "<image>\nwhat color is at 1 2 ?"
    assert chat._prompt(question, 1, "doc") == "<image>\nwhat color is at 1 2 ?"  # this checkpoint's template
    assert plain._prompt("<image> left of <image> ?", 2, "doc") == "<image> left of <image> ?"  # the task's own
    assert plain._prompt(question, 2, "doc") == "<image><image>\nwhat color is at 1 2 ?"
    with pytest.raises(InputError, match="prompt=chat formats one image per document"):
        chat._prompt(question, 2, "doc")

"""The ``tokenpress`` command line: plugins, validate, schema, run (in-process, plus one real subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import tokenpress
from tokenpress.tools.cli import main

BUILT_INS = {"fastv": "decoder_layer", "pool": "post_encoder, projector",
             "random": "post_encoder, projector, query_conditioned, decoder_layer"}

GOOD = """\
name: fastv-half
stages:
  - method: fastv
    layers: [2]
    params: {keep_ratio: 0.5}
"""

MIXED = """\
name: mixed
positions: compact
stages:
  - method: pool
    params: {kernel: 2, mode: avg}
  - method: random
    at: query_conditioned
    params: {keep_ratio: 0.5, seed: 1}
  - method: fastv
    layers: [1, 3]
"""


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "square.png"
    picture = Image.new("RGB", (48, 48), (20, 20, 20))
    picture.paste((200, 40, 40), (8, 8, 32, 32))
    picture.save(path)
    return path


@pytest.fixture
def good_stack(tmp_path: Path) -> Path:
    path = tmp_path / "fastv.yaml"
    path.write_text(GOOD, encoding="utf-8")
    return path


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tokenpress: error: ") and "Traceback" not in err
    return lines[0]


# --- plugins ----------------------------------------------------------------------------------------


def test_plugins_lists_built_ins_with_points_and_origin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    for name, points in BUILT_INS.items():
        assert points in rows[name]
        assert f"tokenpress {tokenpress.__version__} (entry point {name})" in rows[name]
    families = next(line for line in out.splitlines() if line.startswith("model families: "))
    assert f"llava (tokenpress {tokenpress.__version__} (entry point llava))" in families


def test_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(BUILT_INS) <= set(listed)
    for name, points in BUILT_INS.items():
        assert listed[name]["points"] == points
        assert listed[name]["origin"].startswith("tokenpress ") and f"entry point {name}" in listed[name]["origin"]
        assert listed[name]["description"]


# --- validate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [GOOD, MIXED], ids=["fastv", "mixed"])
def test_validate_good_stack(text: str, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(text, encoding="utf-8")
    stack = tokenpress.load_stack(path)
    for extra in ([], ["--model", str(checkpoint)]):
        assert main(["validate", str(path), *extra]) == 0
        out, err = capsys.readouterr()
        assert err == ""
        assert f"{path}: ok - stack {stack.name!r}, {len(stack.stages)} stage(s)" in out
        for stage in stack.stages:
            assert stage.label() in out


def test_validate_rejects_a_model_no_adapter_supports(good_stack: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(folder)
    assert main(["validate", str(good_stack), "--model", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(folder) in line and "'bert'" in line


# --- schema -----------------------------------------------------------------------------------------


def test_schema_is_json_listing_the_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    stage = schema["$defs"]["StageSpec"]
    assert set(BUILT_INS) <= set(stage["properties"]["method"]["enum"])
    assert schema["additionalProperties"] is False and stage["additionalProperties"] is False
    rules = {rule["if"]["properties"]["method"]["const"]: rule["then"]["properties"] for rule in stage["allOf"]}
    assert rules["fastv"]["at"]["enum"] == ["decoder_layer"]
    assert "keep_ratio" in rules["fastv"]["params"]["properties"]
    output = tmp_path / "schema.json"
    assert main(["schema", "-o", str(output)]) == 0
    assert json.loads(output.read_text(encoding="utf-8")) == schema


def test_schema_validates_good_and_rejects_bad_stacks(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    for text in (GOOD, MIXED):
        validator.validate(yaml.safe_load(text))
    bad = [
        {"name": "x", "stages": [{"method": "fastvv", "layers": [1]}]},
        {"name": "x", "stages": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 0}}]},
        {"name": "x", "stages": [{"method": "fastv", "at": "post_encoder"}]},
        {"name": "x", "stages": [{"method": "pool", "params": {"keep_ratio": 0.5}}]},
        {"name": "x", "stage": []},
    ]
    for data in bad:
        assert not validator.is_valid(data), data


# --- run --------------------------------------------------------------------------------------------


def test_run_prints_answer_and_report(good_stack: Path, checkpoint: Path, image: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(good_stack), "--model", str(checkpoint), "--image", str(image), "--prompt", "w5 w6",
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert re.fullmatch(r"answer: [wx]\d+( [wx]\d+){0,3}", lines[0]), lines[0]  # at most 4 new words
    assert "stack 'fastv-half'" in out
    row = next(line for line in lines if line.startswith("0:fastv(decoder_layer@2)"))
    assert row.split() == ["0:fastv(decoder_layer@2)", "layer", "2", "keep", "36", "18"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == lines[0].removeprefix("answer: ")
    assert [(s["stage"], s["layer"], s["tokens_in"], s["tokens_out"]) for s in result["stages"]] == [
        ("0:fastv(decoder_layer@2)", 2, [36], [18])
    ]


@pytest.mark.parametrize("what", ["image", "model", "model_not_a_checkpoint", "image_not_an_image", "stack"])
def test_run_user_mistakes_exit_2_with_one_line(what: str, good_stack: Path, checkpoint: Path, image: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"stack": good_stack, "model": checkpoint, "image": image}
    if what == "image":
        paths["image"] = tmp_path / "missing.png"
    elif what == "model":
        paths["model"] = tmp_path / "missing-model"
    elif what == "model_not_a_checkpoint":
        paths["model"] = tmp_path
    elif what == "image_not_an_image":
        paths["image"] = tmp_path / "notes.png"
        paths["image"].write_text("not a picture", encoding="utf-8")
    else:
        paths["stack"] = tmp_path / "missing.yaml"
    key = what.split("_")[0]
    argv = ["run", str(paths["stack"]), "--model", str(paths["model"]), "--image", str(paths["image"]),
            "--prompt", "w5 w6"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_error_line(err).startswith(f"tokenpress: error: {paths[key]}: ")


def test_console_script_in_subprocess(tmp_path: Path) -> None:
    """The installed entry point works in a real process: a bad stack gives exit 2 and one line on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("0.5", "0"), encoding="utf-8")
    script = Path(sys.executable).with_name("tokenpress")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tokenpress.tools.cli"]
    result = subprocess.run([*command, "validate", str(bad)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert (result.returncode, result.stdout) == (2, "")
    assert one_error_line(result.stderr) == (
        f"tokenpress: error: {bad}: stages[0]: params.keep_ratio: Input should be greater than 0 (got 0)"
    )

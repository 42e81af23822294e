"""Output paths of every subcommand are checked before any work (issue 23), and a few CLI mistakes are
said in one line: negative seeds and counts, ``fit --resume`` with nothing to resume, ``run --image``
on a folder; ``run`` on a proxy explains an empty answer; ``--quiet`` silences the weight-loading bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenpress.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
EMPTY = str(ROOT / "stacks" / "empty.yaml")
ALVTS = str(ROOT / "stacks" / "alvts.yaml")  # calibratable
UNSHUFFLE = str(ROOT / "stacks" / "pixel-unshuffle.yaml")  # has weights to fit
PROXY = "zoo:llava-shapes"
UNWRITABLE = "/proc/tokenpress-test"  # an existing folder that accepts no new file, even for root


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a subcommand loads a model (all pass through loading.load_config, or build one from a
    config for bench/profile --config, or trains one for zoo train) fails the test: a refused output must be
    refused before that."""
    from tokenpress.measure import bench
    from tokenpress.runtime import loading
    from tokenpress.tools import zoo_train as train

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(loading, "load_config", loaded)
    monkeypatch.setattr(bench, "model_from_config", loaded)
    monkeypatch.setattr(train, "train", loaded)


@pytest.fixture
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "shapes.png"
    from tokenpress.data import shapes

    shapes.make_sample("test", 0, 0).image.save(path)
    return path


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def one_line(err: str, prefix: str = "tokenpress: error: ") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


# --- every output option: a bad path is refused before any work ----------------------------------------------------

#: (subcommand argv before the option, the option, what it writes: a file suffix or "folder")
OUTPUTS: list[tuple[list[str], str, str]] = [
    (["eval", EMPTY, "--n", "2"], "--json", ".json"),
    (["eval", EMPTY, "--n", "2"], "--csv", ".csv"),
    (["eval", EMPTY, "--n", "2"], "--plot", ".png"),
    (["schema"], "-o", ".json"),
    (["calibrate", ALVTS, "--model", PROXY, "--samples", "2"], "--out", ".safetensors"),
    (["fit", UNSHUFFLE, "--model", PROXY, "--steps", "1"], "--out", "folder"),
    (["bench", "--repeats", "1"], "--markdown", ".md"),
    (["bench", "--repeats", "1"], "--json", ".json"),
    (["bench", "--repeats", "1"], "--plot", ".png"),
    (["profile", EMPTY], "--trace", "folder"),
    (["viz", EMPTY, "--image", "IMAGE"], "-o", ".png"),
    (["leaderboard", "--n", "2"], "--out", ".md"),
    (["zoo", "card", PROXY, "--n", "2"], "--out", "folder"),
    (["zoo", "train", "llava-shapes", "--steps", "1"], "--out", "folder"),
]

BAD = {
    "unwritable": lambda tmp, suffix: f"{UNWRITABLE}/out{'' if suffix == 'folder' else suffix}",
    "wrong-kind": lambda tmp, suffix: str(tmp / ("a-file.txt" if suffix == "folder" else "a-folder")),
    "wrong-suffix": lambda tmp, suffix: str(tmp / "missing" / "out.txt"),
    "under-a-file": lambda tmp, suffix: str(tmp / "a-file.txt" / "out"),
    "trailing-slash": lambda tmp, suffix: f"{tmp / 'missing'}/",
}
FILE_ONLY = {"wrong-suffix", "trailing-slash"}  # a folder has no suffix, and may end in /

CASES = [(argv, option, writes, bad) for argv, option, writes in OUTPUTS for bad in BAD
         if not (bad in FILE_ONLY and writes == "folder")]


@pytest.mark.parametrize(("argv", "option", "writes", "bad"), CASES,
                         ids=[f"{' '.join(argv[:2] if argv[0] == 'zoo' else argv[:1])} {option} {bad}"
                              for argv, option, _, bad in CASES])
def test_a_bad_output_path_is_refused_in_one_line_before_any_work(
        argv: list[str], option: str, writes: str, bad: str, tmp_path: Path, image: Path, no_model_loading: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file.txt").write_text("keep me", encoding="utf-8")
    before = files_under(tmp_path)
    path = BAD[bad](tmp_path, writes)
    args = [str(image) if arg == "IMAGE" else arg for arg in argv]
    assert main([*args, option, path]) == 2
    out, err = capsys.readouterr()
    line = one_line(err)
    names = ("-o", "--output") if option == "-o" else (option,)
    assert any(f"{name} {path}" in line for name in names), line  # the option and the path (a suffix may follow)
    assert files_under(tmp_path) == before  # nothing written, no folder created
    assert (tmp_path / "a-file.txt").read_text(encoding="utf-8") == "keep me"
    assert out == ""


def test_the_leaderboard_refuses_a_file_where_its_plots_folder_goes(tmp_path: Path, no_model_loading: None,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "board").write_text("not a folder", encoding="utf-8")
    assert main(["leaderboard", "--n", "2", "--out", str(tmp_path / "board.md")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--out {tmp_path / 'board'}: is a file" in line
    assert not (tmp_path / "board.md").exists()


# --- suffixes and parent folders: the printed path is the written one -------------------------------------------


def test_eval_adds_missing_suffixes_creates_parents_and_prints_what_it_wrote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "new" / "deeper"
    argv = ["eval", EMPTY, "--n", "2", "--batch-size", "2", "--quiet",
            "--plot", str(folder / "myplot"), "--json", str(folder / "rows"), "--csv", str(tmp_path / "rows.CSV")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / 'myplot.png'}" in out and f"wrote {folder / 'rows.json'}" in out
    assert f"wrote {tmp_path / 'rows.CSV'}" in out  # a suffix in another case is the right suffix
    assert (folder / "myplot.png").read_bytes().startswith(b"\x89PNG")
    assert [row["stack"] for row in json.loads((folder / "rows.json").read_text(encoding="utf-8"))] == [
        "baseline", "empty"]
    assert sorted(p.name for p in folder.iterdir()) == ["myplot.png", "rows.json"]


def test_schema_adds_its_suffix_creates_parents_and_overwrites(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a" / "b" / "schema"
    assert main(["schema", "-o", str(target)]) == 0
    assert capsys.readouterr().out == f"wrote {target}.json\n"
    assert json.loads(Path(f"{target}.json").read_text(encoding="utf-8"))["$defs"]["StageSpec"]
    assert not target.exists()
    Path(f"{target}.json").write_text("old", encoding="utf-8")  # an existing file is replaced
    assert main(["schema", "-o", str(target)]) == 0
    assert json.loads(Path(f"{target}.json").read_text(encoding="utf-8"))["$defs"]["StageSpec"]


@pytest.mark.parametrize("argv", [["eval", EMPTY], ["schema"], ["calibrate", ALVTS, "--model", PROXY],
                                  ["fit", UNSHUFFLE, "--model", PROXY], ["bench"], ["profile", EMPTY],
                                  ["viz", EMPTY, "--image", "x.png"], ["leaderboard"], ["zoo", "card", PROXY],
                                  ["zoo", "train"]],
                         ids=lambda argv: "-".join(argv[:2] if argv[0] == "zoo" else argv[:1]))
def test_help_states_the_output_rules(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv[: 2 if argv[0] == "zoo" else 1], "--help"]) == 0
    assert "missing parent folders are created" in " ".join(capsys.readouterr().out.split())


# --- numbers: one line from argparse --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "option"), [
    (["eval", EMPTY, "--seed", "-1"], "--seed"),
    (["calibrate", ALVTS, "--model", PROXY, "--seed", "-3"], "--seed"),
    (["calibrate", ALVTS, "--model", PROXY, "--lr", "nan"], "--lr"),
    (["fit", UNSHUFFLE, "--model", PROXY, "--seed", "-1"], "--seed"),
    (["fit", UNSHUFFLE, "--model", PROXY, "--lr", "0"], "--lr"),
    (["fit", UNSHUFFLE, "--model", PROXY, "--eval-n", "-1"], "--eval-n"),
    (["zoo", "card", PROXY, "--out", "x", "--n", "0"], "--n"),
    (["zoo", "card", PROXY, "--out", "x", "--batch-size", "0"], "--batch-size"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--batch-size", "0"], "--batch-size"),
    (["profile", EMPTY, "--max-new-tokens", "0"], "--max-new-tokens"),
], ids=lambda value: value.lstrip("-") if isinstance(value, str) else "-".join(value[:2 if value[0] == "zoo" else 1]))
def test_out_of_range_numbers_are_refused_by_the_parser(argv: list[str], option: str, no_model_loading: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    command = " ".join(argv[:2] if argv[0] == "zoo" else argv[:1])
    line = one_line(capsys.readouterr().err, prefix=f"tokenpress {command}: error: argument {option}")
    assert "must be" in line


# --- fit --resume, run --image DIR, run on a proxy, --quiet --------------------------------------------------------


def test_fit_resume_without_a_saved_state_is_refused(tmp_path: Path, no_model_loading: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-folder").mkdir()
    for out in (tmp_path / "empty-folder", tmp_path / "missing"):
        assert main(["fit", UNSHUFFLE, "--model", PROXY, "--steps", "1", "--out", str(out), "--resume"]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"--resume: {out} holds no fit-state.pt" in line
    assert not (tmp_path / "missing").exists()


def test_run_on_a_folder_says_it_is_a_folder(tmp_path: Path, no_model_loading: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", EMPTY, "--model", PROXY, "--image", str(tmp_path), "--prompt", "what color is at 1 1 ?"]) == 2
    assert one_line(capsys.readouterr().err) == f"tokenpress: error: {tmp_path}: is a folder, not an image file"


def test_a_proxy_explains_an_empty_answer(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(prompt: str, *extra: str) -> tuple[str, str]:
        assert main(["run", EMPTY, "--model", PROXY, "--image", str(image), "--prompt", prompt, *extra]) == 0
        return capsys.readouterr()

    out, _ = run("describe this picture")
    lines = out.splitlines()
    assert lines[0] == "answer: "
    assert lines[1].startswith(f"hint: {PROXY} is a proxy trained only on the shapes benchmark's questions")
    assert '"what color is at 3 5 ?"' in lines[1]
    out, err = run("describe this picture", "--json")
    assert json.loads(out)["answer"] == ""
    assert "hint: " in err
    out, _ = run("what color is at 1 1 ?")
    assert out.splitlines()[0] != "answer: " and "hint:" not in out


def test_quiet_eval_prints_no_weight_loading_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    assert main(["eval", EMPTY, "--n", "1", "--batch-size", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert transformers_logging.is_progress_bar_enabled() == enabled  # restored afterwards


"""A third-party plugin is found through the ``tokenpress.plugins`` entry-point group, like a pip-installed one.

Each test builds throwaway distributions (a module plus a ``*.dist-info`` folder with ``entry_points.txt``)
in ``tmp_path`` and puts that folder on ``sys.path``; ``importlib.metadata`` then sees them exactly as
installed packages. Every test rebuilds the process-wide registry afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
import torch

import tokenpress
from tokenpress.testing.models import llava_batch, sample_prompts, tiny_llava
from tokenpress.tools.cli import main

#: The methods tokenpress itself ships: its own entry points (pyproject.toml).
BUILT_INS = set(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
                ["project"]["entry-points"]["tokenpress.plugins"])
ACME_ORIGIN = "acme-tokenpress 0.1 (entry point acme)"

ACME_MODULE = '''\
"""acme's tokenpress plugin: keep the first keep_ratio of each image's tokens."""

from __future__ import annotations

import torch

from tokenpress import Method, SelectingConfig, StageContext, TokenState, hookimpl, keep_count


class KeepFirst(Method):
    name = "acme-keepfirst"
    Config = SelectingConfig
    points = ("post_encoder",)
    description = "Keep the first keep_ratio of each image's visual tokens (acme)."

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        counts = keep_count(tokens.counts(), self.config.keep_ratio).to(tokens.valid.device)
        rank = tokens.valid.long().cumsum(-1)
        return tokens.keep(tokens.valid & (rank <= counts.unsqueeze(-1)))

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [KeepFirst]
'''

# A second vendor that (wrongly) registers a method under the built-in name "fastv".
DUPLICATE_MODULE = '''\
from tokenpress import DecoderContext, Keep, Method, SelectingConfig, hookimpl


class NotFastV(Method):
    name = "fastv"
    Config = SelectingConfig
    points = ("decoder_layer",)

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep:
        return Keep(context.is_visual)


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [NotFastV]
'''

BROKEN_MODULE = 'raise ImportError("acme-broken needs libacme.so")\n'

MODULES = ("acme_tokenpress", "dup_tokenpress", "broken_tokenpress")


def make_distribution(root: Path, dist: str, version: str, module: str, source: str, entry_point: str) -> None:
    """Write ``module.py`` and a ``dist-info`` folder declaring it in the ``tokenpress.plugins`` group."""
    (root / f"{module}.py").write_text(source, encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[tokenpress.plugins]\n{entry_point} = {module}\n", encoding="utf-8")


@pytest.fixture
def isolated() -> Iterator[pytest.MonkeyPatch]:
    """A monkeypatch whose changes (env, sys.path) are undone BEFORE the registry is rebuilt."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("TOKENPRESS_DISABLE_PLUGIN_AUTOLOAD", "TOKENPRESS_PLUGINS", "TOKENPRESS_BLOCK_PLUGINS"):
            patch.delenv(name, raising=False)
        yield patch
    for module in MODULES:
        sys.modules.pop(module, None)
    registry = tokenpress.get_registry(reload=True)
    assert "acme-keepfirst" not in registry.methods and set(registry.methods) >= BUILT_INS


@pytest.fixture
def acme(tmp_path: Path, isolated: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The acme distribution 'installed' on sys.path (registry not yet rebuilt)."""
    make_distribution(tmp_path, "acme-tokenpress", "0.1", "acme_tokenpress", ACME_MODULE, "acme")
    isolated.syspath_prepend(str(tmp_path))
    return isolated


def test_entry_point_plugin_is_discovered(acme: pytest.MonkeyPatch) -> None:
    registry = tokenpress.get_registry(reload=True)
    assert set(registry.methods) == BUILT_INS | {"acme-keepfirst"}
    assert registry.origins["acme-keepfirst"] == ACME_ORIGIN
    assert registry.methods["acme-keepfirst"].__module__ == "acme_tokenpress"
    assert registry.origins["fastv"].startswith("tokenpress ")
    assert "acme-keepfirst" in tokenpress.list_methods()


def test_plugins_command_lists_it(acme: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tokenpress.get_registry(reload=True)
    assert main(["plugins"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("acme-keepfirst"))
    assert row.split()[1] == "post_encoder" and row.endswith(ACME_ORIGIN)
    assert main(["plugins", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["acme-keepfirst"]["origin"] == ACME_ORIGIN
    assert listed["acme-keepfirst"]["description"].startswith("Keep the first")


def test_it_runs_in_a_stack(acme: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tokenpress.get_registry(reload=True)
    stack = tmp_path / "acme.yaml"
    stack.write_text(textwrap.dedent("""\
        name: acme-then-fastv
        stages:
          - method: acme-keepfirst
            params: {keep_ratio: 0.25}
          - method: fastv
            layers: [2]
            params: {keep_ratio: 0.5}
        """), encoding="utf-8")
    model = tiny_llava()
    batch = llava_batch(model, sample_prompts(2))
    with torch.no_grad():
        full = model(**batch).logits
        with tokenpress.compress(model, stack) as handle:
            compressed = model(**batch).logits
            records = handle.report().as_dicts()
    assert [(r["method"], r["point"], r["tokens_in"], r["tokens_out"]) for r in records] == [
        ("acme-keepfirst", "post_encoder", [36, 36], [9, 9]),  # 6x6 patches, keep 0.25
        ("fastv", "decoder_layer", [9, 9], [4, 4]),  # round(4.5) = 4
    ]
    assert compressed.shape == full.shape and torch.isfinite(compressed).all()
    assert not torch.allclose(compressed, full)
    assert "forward" not in model.model.__dict__


def test_blocked_by_environment(acme: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acme.setenv("TOKENPRESS_BLOCK_PLUGINS", "acme")
    registry = tokenpress.get_registry(reload=True)
    assert set(registry.methods) == BUILT_INS
    assert "acme_tokenpress" not in sys.modules  # blocked means not even imported
    stack = tmp_path / "acme.yaml"
    stack.write_text("name: a\nstages:\n  - method: acme-keepfirst\n", encoding="utf-8")
    with pytest.raises(tokenpress.StackError, match=r"stages\[0\]\.method: unknown method 'acme-keepfirst'"):
        tokenpress.load_stack(stack)
    assert main(["validate", str(stack)]) == 2
    assert "unknown method 'acme-keepfirst'" in capsys.readouterr().err


def test_blocked_by_argument(acme: pytest.MonkeyPatch) -> None:
    assert "acme-keepfirst" in tokenpress.get_registry(reload=True).methods
    registry = tokenpress.get_registry(block=("acme", "pool"))
    assert set(registry.methods) == BUILT_INS - {"pool"}
    assert registry.blocked == ("acme", "pool")


def test_autoload_disabled_loads_nothing(acme: pytest.MonkeyPatch) -> None:
    acme.setenv("TOKENPRESS_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = tokenpress.get_registry(reload=True)
    assert registry.methods == {}  # not even the built-ins: they are entry points like any other
    assert "llava" in [adapter.family for adapter in registry.adapters]  # families stay: their own group
    assert registry.origins["adapter:llava"] == f"tokenpress {tokenpress.__version__} (entry point llava)"
    assert "acme_tokenpress" not in sys.modules


def test_autoload_disabled_loads_named_plugins(acme: pytest.MonkeyPatch) -> None:
    acme.setenv("TOKENPRESS_DISABLE_PLUGIN_AUTOLOAD", "1")
    acme.setenv("TOKENPRESS_PLUGINS", "acme, fastv")
    registry = tokenpress.get_registry(reload=True)
    assert set(registry.methods) == {"acme-keepfirst", "fastv"}
    assert registry.origins["acme-keepfirst"] == ACME_ORIGIN
    # a name that is not an entry point is imported as a module
    acme.setenv("TOKENPRESS_PLUGINS", "acme_tokenpress")
    registry = tokenpress.get_registry(reload=True)
    assert set(registry.methods) == {"acme-keepfirst"}
    assert registry.origins["acme-keepfirst"] == "module acme_tokenpress"
    acme.setenv("TOKENPRESS_PLUGINS", "acme_tokenpres")
    with pytest.raises(tokenpress.PluginError, match="'acme_tokenpres'.*neither an entry point nor an importable"):
        tokenpress.get_registry(reload=True)


def test_duplicate_method_name_names_both_origins(acme: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    make_distribution(tmp_path, "dup-tokenpress", "0.2", "dup_tokenpress", DUPLICATE_MODULE, "dupfastv")
    with pytest.raises(tokenpress.PluginError) as info:
        tokenpress.get_registry(reload=True)
    message = str(info.value)
    assert "'fastv'" in message and "registered twice" in message
    assert f"tokenpress {tokenpress.__version__} (entry point fastv)" in message
    assert "dup-tokenpress 0.2 (entry point dupfastv)" in message
    # the CLI of a fresh process (no registry built yet) reports it as one line, exit 2
    acme.setattr(tokenpress.core.registry, "_REGISTRY", None)
    assert main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "dup-tokenpress 0.2" in err and "Traceback" not in err
    # blocking the offender is the way out
    acme.setenv("TOKENPRESS_BLOCK_PLUGINS", "dupfastv")
    assert tokenpress.get_registry(reload=True).origins["fastv"].startswith("tokenpress ")


def test_entry_point_name_taken_twice_is_an_error(acme: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A third-party entry point called 'pool' must not silently shadow (or be shadowed by) the built-in."""
    make_distribution(tmp_path, "dup-tokenpress", "0.2", "dup_tokenpress", DUPLICATE_MODULE.replace('"fastv"', '"x"'),
                      "pool")
    with pytest.raises(tokenpress.PluginError) as info:
        tokenpress.get_registry(reload=True)
    message = str(info.value)
    assert "'pool'" in message and "declared twice" in message
    assert "dup-tokenpress 0.2 (entry point pool)" in message
    assert f"tokenpress {tokenpress.__version__} (entry point pool)" in message


def test_an_approach_outside_the_surveys_families_is_named(acme: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The methods index groups by ``Method.approach``: a typo there is a plugin error naming the origin."""
    source = DUPLICATE_MODULE.replace('"fastv"', '"acme-x"').replace(
        'points = ("decoder_layer",)', 'points = ("decoder_layer",)\n    approach = "atention"')
    make_distribution(tmp_path, "dup-tokenpress", "0.2", "dup_tokenpress", source, "acmex")
    with pytest.raises(tokenpress.PluginError, match=r"dup-tokenpress 0\.2 .*'acme-x' declares approach 'atention', "
                                                     r"not one of transform, similarity, attention, query"):
        tokenpress.get_registry(reload=True)


def test_broken_plugin_is_named(acme: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_distribution(tmp_path, "acme-broken", "1.0", "broken_tokenpress", BROKEN_MODULE, "broken")
    with pytest.raises(tokenpress.PluginError, match=r"'broken' \(acme-broken 1\.0 .*libacme\.so"):
        tokenpress.get_registry(reload=True)
    acme.setenv("TOKENPRESS_BLOCK_PLUGINS", "broken")
    assert "acme-keepfirst" in tokenpress.get_registry(reload=True).methods


def test_plugins_command_in_a_subprocess(tmp_path: Path) -> None:
    """A real process with the distribution on PYTHONPATH lists acme's method and its origin."""
    make_distribution(tmp_path, "acme-tokenpress", "0.1", "acme_tokenpress", ACME_MODULE, "acme")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOKENPRESS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "tokenpress.tools.cli", "plugins"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert rows["acme-keepfirst"].endswith(ACME_ORIGIN)
    assert set(rows) >= BUILT_INS

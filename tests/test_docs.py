"""The documentation site: its example code runs, every built-in method has a page, and it builds.

Code blocks with a file name (```` ```python title="acme_keepfirst.py" ````) in the docs are the
examples: they are written to a temporary folder, imported and run on a tiny LLaVA here, so the
text and the tests cannot drift apart.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

import tokenpress
from tokenpress.testing import llava_batch, sample_prompts, tiny_llava
from tokenpress.testing.families import FAMILIES

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
AUTHORING = DOCS / "plugin-authoring.md"
BLOCK = re.compile(r'^```(?P<lang>\w+)(?P<attrs>[^\n]*)\n(?P<code>.*?)^```', re.MULTILINE | re.DOTALL)
EXAMPLE_MODULES = ("acme_keepfirst", "acme_routetop", "acme_clskeep", "stage_timer", "test_acme_keepfirst")


def blocks(path: Path, lang: str | None = None) -> list[tuple[str | None, str]]:
    """(title, code) of every fenced block of a page (in language ``lang`` only, if given)."""
    found = []
    for match in BLOCK.finditer(path.read_text(encoding="utf-8")):
        if lang is None or match["lang"] == lang:
            title = re.search(r'title="([^"]+)"', match["attrs"])
            found.append((title[1] if title else None, match["code"]))
    return found


def titled(path: Path, title: str) -> str:
    codes = [code for name, code in blocks(path) if name == title]
    assert len(codes) == 1, f"{path.name} should hold exactly one block titled {title!r}"
    return codes[0]


def stack_blocks(path: Path) -> list[dict]:
    """The YAML blocks of a page that are whole stacks (they have a name and stages)."""
    stacks = []
    for _, code in blocks(path, "yaml"):
        data = yaml.safe_load(code)
        if isinstance(data, dict) and "name" in data and "stages" in data:
            stacks.append(data)
    return stacks


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    """The plugin-authoring page's example files, importable; the registry is rebuilt afterwards."""
    for title, code in blocks(AUTHORING, "python"):
        if title:
            (tmp_path / title).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = {name: importlib.import_module(name) for name in EXAMPLE_MODULES}
    yield modules
    for name in EXAMPLE_MODULES:
        sys.modules.pop(name, None)
    tokenpress.get_registry(reload=True)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llava("sdpa")


def stack_named(name: str) -> dict:
    matches = [stack for stack in stack_blocks(AUTHORING) if stack["name"] == name]
    assert len(matches) == 1
    return matches[0]


# --- (1) the plugin-authoring examples run ---------------------------------------------------------


@torch.no_grad()
def test_keepfirst_plugin_runs_in_a_stack(examples, model):
    tokenpress.register_plugin(examples["acme_keepfirst"])
    assert tokenpress.get_registry().origins["acme-keepfirst"] == "acme_keepfirst"
    batch = llava_batch(model, sample_prompts(2))
    with tokenpress.compress(model, stack_named("first-quarter")) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert handle.report().records[0].tokens_out == [9, 9]  # round(36 x 0.25)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    both_points = {"name": "both", "stages": [
        {"method": "acme-keepfirst", "params": {"keep_ratio": 0.5}},
        {"method": "acme-keepfirst", "at": "query_conditioned", "params": {"keep_ratio": 0.5, "from_end": True}},
    ]}
    with tokenpress.compress(model, both_points) as handle:
        model(**batch)
    assert [record.tokens_out for record in handle.report().records] == [[18, 18], [9, 9]]


def test_keepfirst_keeps_the_first_or_the_last_tokens(examples):
    module = examples["acme_keepfirst"]
    tokens = tokenpress.TokenState.from_dense(torch.randn(2, 36, 8), grid=(1, 6, 6))
    first = module.KeepFirst(module.KeepFirstConfig(keep_ratio=0.25)).post_encoder(tokens=tokens, context=None)
    last = module.KeepFirst(module.KeepFirstConfig(keep_ratio=0.25, from_end=True)).post_encoder(
        tokens=tokens, context=None)
    assert first.grid_index.tolist() == [list(range(9))] * 2
    assert last.grid_index.tolist() == [list(range(27, 36))] * 2
    assert module.KeepFirst(module.KeepFirstConfig()).promised_count(torch.tensor([36, 7])).tolist() == [18, 4]


def test_the_example_tests_pass(examples):
    test_module = examples["test_acme_keepfirst"]
    test_functions = [getattr(test_module, name) for name in dir(test_module) if name.startswith("test_")]
    assert len(test_functions) == 2
    for test_function in test_functions:
        test_function()


@torch.no_grad()
def test_route_example_routes_and_generates_consistently(examples, model):
    tokenpress.register_plugin(examples["acme_routetop"])
    batch = llava_batch(model, sample_prompts(3, seed=1))
    with tokenpress.compress(model, stack_named("route-top-half")) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        records = handle.report().records
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert [(record.action, record.layer, record.tokens_out) for record in records] == [
        ("route", 1, [18, 18, 18]), ("route", 2, [18, 18, 18])]
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_signal_example_gets_the_cls_attention(examples, model):
    tokenpress.register_plugin(examples["acme_clskeep"])
    batch = llava_batch(model, sample_prompts(2))
    stack = {"name": "cls", "stages": [{"method": "pool", "params": {"kernel": 2}},
                                       {"method": "acme-clskeep", "params": {"keep_ratio": 0.5}}]}
    with tokenpress.compress(model, {"name": "cls", "stages": [{"method": "acme-clskeep"}]}) as handle:
        model(**batch)
    assert handle.report().records[0].tokens_out == [18, 18]
    with tokenpress.compress(model, stack) as handle:  # after pooling, through the tokens' provenance
        model(**batch)
    assert handle.report().records[1].tokens_out == [4, 4]  # round(9 x 0.5), halves to even


@torch.no_grad()
def test_observer_example_times_every_stage(examples, model):
    timer = examples["stage_timer"].StageTimer()
    tokenpress.register_plugin(timer, name="stage-timer")
    batch = llava_batch(model, sample_prompts(2))
    with tokenpress.compress(model, ROOT / "stacks" / "pool-then-fastv.yaml"):
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert set(timer.seconds) == {"0:pool(post_encoder)", "1:fastv(decoder_layer@2)"}
    assert all(seconds > 0 for seconds in timer.seconds.values())


CONTRACT_EXAMPLES = {"acme_keepfirst": "acme-keepfirst", "acme_routetop": "acme-routetop",
                     "acme_clskeep": "acme-clskeep"}


def test_the_examples_pass_the_contract_kit(pytester: pytest.Pytester) -> None:
    """Each example plugin of Writing a plugin, run through the method contract kit the way its
    author would; acme-clskeep needs LLaVA-1.5's CLS attention, so it is skipped elsewhere."""
    for title, code in blocks(AUTHORING, "python"):
        if title and title.removesuffix(".py") in CONTRACT_EXAMPLES:
            pytester.makepyfile(**{title.removesuffix(".py"): code})
    pytester.makeconftest("import tokenpress\n" + "".join(
        f"import {module}\ntokenpress.register_plugin({module})\n" for module in CONTRACT_EXAMPLES))
    pytester.makepyfile(test_examples="from tokenpress.testing import MethodContract\n" + "".join(
        f"\n\nclass Test{module.title().replace('_', '')}(MethodContract):\n    method = {name!r}\n"
        for module, name in CONTRACT_EXAMPLES.items()))
    try:
        result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    finally:
        tokenpress.get_registry(reload=True)
    output = result.stdout.str()
    assert result.ret == 0, output
    # eleven checks; the weights and grid checks skip methods without weights or that do not re-grid
    # (all three)
    checks = 11 - 2
    # keepfirst runs every check on every family; routetop and clskeep make no token promise and have
    # no identity setting (2 checks skipped); clskeep runs where the encoder has a class token
    families = len(FAMILIES)
    with_cls = [a.family for a in tokenpress.get_registry().adapters if "cls_attention" in a.signals]
    assert {"llava", "llava-next"} <= set(with_cls)
    clskeep = sum(1 for family in FAMILIES if family in with_cls)
    assert result.parseoutcomes()["passed"] == families * checks + (families + clskeep) * (checks - 2), output
    for family in FAMILIES:
        if family not in with_cls:
            assert f"acme-clskeep cannot run on {family}: " in output, output


def test_entry_point_example_names_the_example_module():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(titled(AUTHORING, "pyproject.toml"))
    assert project["project"]["entry-points"]["tokenpress.plugins"] == {"acme": "acme_keepfirst"}


# --- stacks and snippets elsewhere in the docs ------------------------------------------------------


def test_every_whole_stack_in_the_docs_is_valid(examples):
    for name in ("acme_keepfirst", "acme_routetop"):
        tokenpress.register_plugin(examples[name])
    pages = sorted(DOCS.glob("*.md"))
    checked = 0
    for page in pages:
        for stack in stack_blocks(page):
            tokenpress.load_stack(stack)
            checked += 1
    assert checked >= 8


@torch.no_grad()
def test_getting_started_example_prints_the_report_shown(tmp_path, monkeypatch):
    page = DOCS / "getting-started.md"
    (tmp_path / "my-stack.yaml").write_text(titled(page, "my-stack.yaml"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(titled(page, "try_it.py"), "try_it.py", "exec"), {"__name__": "try_it"})
    shown = [code for _, code in blocks(page, "text")]
    assert output.getvalue().strip() in [text.strip() for text in shown]


# --- (2) every built-in method has a page, in the nav -------------------------------------------------


def built_in_methods() -> dict[str, type]:
    registry = tokenpress.get_registry()
    return {name: cls for name, cls in registry.methods.items()
            if re.match(r"tokenpress \S+ \(entry point ", registry.origins[name])}


def nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    return []


def _method_pages_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("method_pages", DOCS / "_hooks" / "method_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_built_in_method_has_a_page_in_the_nav():
    """The docs hook gives every built-in method (found by its entry point, as the registry has it) a
    nav entry, a page made of its plugin's README and Config reference, and a row of the table."""
    hook = _method_pages_hook()
    methods = built_in_methods()
    assert {"fastv", "pool", "random"} <= set(methods)
    assert set(hook.built_in_methods()) == set(methods)
    configured = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert "docs/_hooks/method_pages.py" in configured["hooks"]
    nav = nav_pages(hook.methods_nav(configured["nav"]))
    table = hook.methods_table()
    for name, method_class in methods.items():
        assert f"methods/{name}.md" in nav, f"docs/methods/{name}.md is not in the mkdocs nav"
        folder = method_class.__module__.split(".")[1]  # tokenpress_plugins.<folder>.method
        hand_written = DOCS / "methods" / f"{name}.md"
        text = hand_written.read_text(encoding="utf-8") if hand_written.is_file() else hook.page_source(method_class)
        assert f'--8<-- "plugins/{folder}/README.md"' in text, f"the {name} page does not include the plugin's README"
        assert f"{method_class.Config.__module__}.{method_class.Config.__qualname__}" in text
        assert (ROOT / "plugins" / folder / "README.md").is_file()
        assert f"[`{name}`]({name}.md)" in table and method_class.description in table


def test_every_top_level_export_is_in_the_api_index():
    text = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    missing = [name for name in tokenpress.__all__ if f"[`{name}`]" not in text]
    assert not missing, f"docs/api/index.md does not list {missing}"


# --- (3) the site builds --------------------------------------------------------------------------


def test_mkdocs_build_is_strict_clean(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", "mkdocs.yml", "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 60
    api = (tmp_path / "site" / "api" / "tokens" / "index.html").read_text(encoding="utf-8")
    assert 'id="tokenpress.tokens.TokenState.keep"' in api  # mkdocstrings rendered the API
    fastv = (tmp_path / "site" / "methods" / "fastv" / "index.html").read_text(encoding="utf-8")
    assert "FastVConfig" in fastv and "keep_ratio" in fastv  # the README and the config reference
    index = (tmp_path / "site" / "methods" / "index.html").read_text(encoding="utf-8")
    for name, method_class in built_in_methods().items():  # every generated page was built and listed
        page = (tmp_path / "site" / "methods" / name / "index.html").read_text(encoding="utf-8")
        assert method_class.Config.__name__ in page, name
        assert f'href="{name}/"' in index, name

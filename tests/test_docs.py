"""The documentation site: its example code runs, every built-in method has a page, the lists that
would drift (methods, commands, the contract kit's checks, the public modules) are generated or
checked against the code, and it builds with ``mkdocs build --strict`` without a warning.

Code blocks with a file name (```` ```python title="acme_keepfirst.py" ````) in the docs are the
examples: they are written to a temporary folder, imported and run on a tiny LLaVA here, so the
text and the tests cannot drift apart.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
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
from typing import ClassVar

import pytest
import torch
import yaml

import tokenpress
from tokenpress.measure import leaderboard
from tokenpress.measure.evaluate import Row
from tokenpress.testing import llava_batch, sample_prompts, tiny_llava
from tokenpress.testing.families import FAMILIES
from tokenpress.tools import cli

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
    with tokenpress.compress(model, {"name": "cls", "stages": [{"method": "acme-clskeep"}]}) as handle:
        model(**batch)
    assert handle.report().records[0].tokens_out == [18, 18]
    then_random = {"name": "cls", "stages": [{"method": "acme-clskeep", "params": {"keep_ratio": 0.5}},
                                             {"method": "random", "at": "projector", "params": {"keep_ratio": 0.5}}]}
    with tokenpress.compress(model, then_random) as handle:
        model(**batch)
    assert [record.tokens_out for record in handle.report().records] == [[18, 18], [9, 9]]
    after_pool = {"name": "cls", "stages": [{"method": "pool", "params": {"kernel": 2}}, {"method": "acme-clskeep"}]}
    with pytest.raises(tokenpress.StackError, match=r"stages\[1\] \(acme-clskeep\) cannot run after stages\[0\] "
                                                    r"\(pool\)"):  # signals are laid out like the encoder's tokens
        tokenpress.compress(model, after_pool)


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
    # twelve checks; the weights and grid checks skip methods without weights or that do not re-grid
    # (all three)
    checks = 12 - 2
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


@functools.cache
def _hook(name: str) -> ModuleType:
    """The mkdocs hook ``docs/_hooks/NAME.py``, loaded the way mkdocs loads it (a file, not a package,
    in ``sys.modules`` under its own name)."""
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "_hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _method_pages_hook() -> ModuleType:
    return _hook("method_pages")


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


def _api_index_sections() -> tuple[str, str]:
    """docs/api/index.md's table of the top level and its table of the other public modules."""
    text = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    top, _, others = text.partition("## Other public modules")
    assert others, "docs/api/index.md has no 'Other public modules' section"
    return top, others


def test_the_api_index_claims_only_top_level_names_that_are_there():
    """A name in the top-level table must be importable from ``tokenpress`` (``prepare_stages`` was listed
    there while only ``tokenpress.runtime.attach`` has it)."""
    top, _ = _api_index_sections()
    claimed = re.findall(r"\[`(\w+)`\]\[tokenpress\.", top)
    assert claimed
    wrong = [name for name in claimed if name not in tokenpress.__all__]
    assert not wrong, f"docs/api/index.md lists {wrong} as top-level names; they are not in tokenpress.__all__"


def plugin_imports() -> set[tuple[str, str]]:
    """(module, name) of every ``from tokenpress... import name`` in the built-in plugins' own code."""
    found = set()
    for path in (ROOT / "plugins").rglob("*.py"):
        if path.name.startswith("test_") or "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tokenpress":
                found |= {(node.module, alias.name) for alias in node.names}
    return found


def test_the_api_index_names_what_the_built_in_plugins_import():
    """A third-party plugin imports what the built-in ones do: each such module has its row in the API
    index with the names imported from it, and an API page in the nav."""
    _, others = _api_index_sections()
    rows = {match[1]: match[0] for match in re.finditer(r"^\| \[`(tokenpress[\w.]*)`\].*$", others, re.MULTILINE)}
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert "api/flops.md" in nav and "api/matching.md" in nav
    imports = plugin_imports()
    assert ("tokenpress.core.select", "topk_mask") in imports and ("tokenpress.core.flops", "StageShape") in imports
    problems = []
    for module, name in sorted(imports):
        if module == "tokenpress":
            submodule = f"tokenpress.{name}"
            if name not in tokenpress.__all__ and submodule not in rows:
                problems.append(f"`from tokenpress import {name}`: neither a top-level name nor a listed module")
        elif module not in rows:
            problems.append(f"{module} (imported for {name}) has no row")
        elif f"`{name}`" not in rows[module]:
            problems.append(f"the {module} row does not name `{name}`")
    assert not problems, "docs/api/index.md, Other public modules:\n  " + "\n  ".join(problems)


#: StageContext fields a stage does not read itself: what random_key() and text_embeddings() are made
#: from, and a dict nothing fills.
STAGE_CONTEXT_PLUMBING = {"sample_keys", "image_rank", "prompt_embeddings", "extras"}


def test_the_stage_context_table_lists_every_member():
    text = AUTHORING.read_text(encoding="utf-8")
    table = text.partition("### Pre-LLM stages: `StageContext`")[2].partition("\n\n|")[2].partition("\n\n")[0]
    members = {field.name for field in dataclasses.fields(tokenpress.StageContext)} | {
        name for name, value in vars(tokenpress.StageContext).items() if callable(value) and not name.startswith("_")}
    missing = sorted(name for name in members - STAGE_CONTEXT_PLUMBING if f"`context.{name}" not in table)
    assert not missing, f"the StageContext table of plugin-authoring.md does not list {missing}"


# --- (2a) the architecture page: every module, the old paths --------------------------------------

ARCHITECTURE = DOCS / "architecture.md"


def package_modules() -> set[str]:
    """Every module of ``tokenpress/`` by its import name (a package by its own name)."""
    modules = set()
    for path in (ROOT / "tokenpress").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules.add(".".join(parts))
    return modules


def architecture_module_list() -> list[str]:
    """The modules named at the start of the items of the architecture page's "Every module" list."""
    section = ARCHITECTURE.read_text(encoding="utf-8").partition("\n## Every module\n")[2].partition("\n## ")[0]
    assert section, "docs/architecture.md has no 'Every module' section"
    return re.findall(r"^- \[?`(tokenpress[\w.]*)`", section, re.MULTILINE)


def test_the_architecture_page_lists_every_module():
    """One line per module of the package: a module added, moved or removed shows here until the page
    says what it holds."""
    listed = architecture_module_list()
    modules = package_modules()
    assert {"tokenpress", "tokenpress.core.flops", "tokenpress.families.llava.costs"} <= modules  # the walk works
    missing = sorted(modules - set(listed))
    assert not missing, f"docs/architecture.md (Every module) does not list {missing}"
    gone = sorted(set(listed) - modules)
    assert not gone, f"docs/architecture.md (Every module) lists modules that do not exist: {gone}"
    twice = sorted({name for name in listed if listed.count(name) > 1})
    assert not twice, f"docs/architecture.md (Every module) lists {twice} more than once"


def test_the_architecture_page_generates_the_old_paths_table():
    """The old module paths are the deprecation aliases' own table (tokenpress._moved.MOVED), rendered by the
    hook: every old path with every place it moved to."""
    from tokenpress._moved import MOVED

    text = ARCHITECTURE.read_text(encoding="utf-8")
    tables = _hook("reference_tables")
    assert tables.MOVED_MARKER in text
    assert "architecture.md" in nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    rows = {match[1]: match[2] for match in re.finditer(r"^\| `(tokenpress[\w.]*)` \| (.*) \|$",
                                                         tables.render(text), re.MULTILINE)}
    assert set(rows) == set(MOVED)
    for old, new in MOVED.items():
        targets = (new,) if isinstance(new, str) else new
        assert re.findall(r"`([\w.]+)`", rows[old]) == list(targets), old
    assert "docs/architecture.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# --- (2b) lists generated from the code: methods, commands, the contract kit's checks -------------


def test_home_and_getting_started_generate_their_lists_of_methods_and_commands():
    """The site's lists of methods and commands are markers the hooks fill from the registry and the CLI
    parser, and what they render names every built-in method and every subcommand."""
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    getting_started = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    methods_hook, tables = _method_pages_hook(), _hook("reference_tables")
    assert methods_hook.TABLE_MARKER in index and tables.COMMANDS_MARKER in index
    assert tables.PLUGINS_MARKER in getting_started
    assert "$ tokenpress plugins\n" not in getting_started, "a hand-written `tokenpress plugins` output"
    methods = methods_hook.methods_table("")
    for name in built_in_methods():
        assert f"[`{name}`](methods/{name}.md)" in methods
    commands = tables.commands_table()
    top_level = {name for action in cli.build_parser()._subparsers._group_actions for name in action.choices}
    listed = [command.name for command in tables.commands()]
    assert top_level == {name.split()[1] for name in listed}
    assert {"tokenpress zoo train", "tokenpress zoo card", "tokenpress leaderboard"} <= set(listed)
    assert all(f"| `{name}" in commands for name in listed)
    plugins = tables.plugins_output()
    assert all(re.search(rf"^{re.escape(name)} ", plugins, re.MULTILINE) for name in built_in_methods())


def test_readme_names_every_built_in_method_and_command():
    """README.md is not built by mkdocs: this test is what keeps its lists whole."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in built_in_methods() if f"\n| `{name}` |" not in readme]
    assert not missing, f"README.md's methods table has no row for {missing}"
    commands = [command.name for command in _hook("reference_tables").commands()]
    missing = [name for name in commands if f"`{name}" not in readme]
    assert not missing, f"README.md does not show {missing}"


def test_the_testing_page_lists_every_check_the_kit_runs():
    """docs/testing.md, as the hook renders it, has one row per ``test_*`` check of MethodContract and
    one per tunable class attribute, and names no check that does not exist."""
    from tokenpress.testing.contract import MethodContract

    rendered = _hook("reference_tables").render((DOCS / "testing.md").read_text(encoding="utf-8"))
    checks = sorted(name for name in dir(MethodContract) if name.startswith("test_"))
    listed = re.findall(r"^\| `(test_\w+)` \|", rendered, re.MULTILINE)
    assert sorted(listed) == checks
    assert {"test_declared_flops_match_the_counter", "test_grid_matches_expected_grid"} <= set(listed)
    unknown = set(re.findall(r"`(test_\w+)`", rendered)) - set(checks)  # a check named in prose or a table
    assert not unknown, f"docs/testing.md names checks the kit does not have: {sorted(unknown)}"
    tunable = [name for name, annotation in MethodContract.__annotations__.items()
               if str(annotation).startswith("ClassVar")]
    assert {"method", "params", "atol"} <= set(tunable)
    undocumented = [name for name in tunable if not re.search(rf"^\| `{name}` \|", rendered, re.MULTILINE)]
    assert not undocumented, (f"MethodContract attributes {undocumented} are missing from docs/testing.md's "
                              "table: give each a `#:` comment in tokenpress/testing/contract.py")
    assert re.search(r"^\| `test_declared_flops_match_the_counter` \|[^\n]* 5%", rendered, re.MULTILINE)  # tolerance


class _TunedKit:
    """A stand-in for MethodContract: what the testing page's generator reads from a kit class."""

    #: Shared by the two attributes right below it.
    first: ClassVar[int] = 1
    second: ClassVar[tuple[int, ...]] = (2,)

    third: ClassVar[int] = 3  # not a `#:` comment: not a documented attribute

    def test_skips_some_families(self, contract_family: str, contract_method: str) -> None:
        """Checks ``something`` |A| wide."""
        if contract_family == "qwen2.5-vl":
            pytest.skip(f"{contract_method} cannot on {contract_family}")

    def helper(self) -> None:
        """Not a check."""


def test_the_kit_tables_are_read_from_the_class():
    tables = _hook("reference_tables")
    assert [(a.name, a.type, a.default, a.meaning) for a in tables.documented_attributes(_TunedKit)] == [
        ("first", "int", "1", "Shared by the two attributes right below it."),
        ("second", "tuple[int, ...]", "(2,)", "Shared by the two attributes right below it.")]
    assert tables.checks_table(_TunedKit).splitlines()[2:] == [
        '| `test_skips_some_families` | Checks `something` \\|A\\| wide. Skips with: "METHOD cannot on FAMILY". |']


# --- the leaderboard page: the writer's layout, and the committed page in it ---------------------


def _fake_board() -> leaderboard.Board:
    entries = [leaderboard.Entry("tome", 0.5, {"name": "tome 50%"}),
               leaderboard.Entry("alvts", 0.5, {"name": "alvts 50%"}, "shipped weights"),
               leaderboard.Entry("qformer", 0.25, {"name": "qformer 25% (unfitted)"}, "unfitted: no weights"),
               leaderboard.Entry("prumerge", None, {"name": "prumerge (own count)"}),
               leaderboard.Entry("fastv", None, {"name": "fastv @ FLOPs 0.5"}, budget=0.5,
                                 knob="keep_ratio=0.01, layers [1] (closest reachable: 0.612)"),
               leaderboard.Entry("tome", None, {"name": "tome @ FLOPs 0.5"}, budget=0.5, knob="keep_ratio=0.4521")]
    rows = [Row("baseline", 0.9, 1.0, 1.0, 1.0, 1.0, {}), Row("tome 50%", 0.81, 0.9, 0.5, 0.557, 0.5434, {}),
            Row("alvts 50%", 0.855, 0.95, 0.5, 0.684, 0.912, {}),
            Row("qformer 25% (unfitted)", 0.45, 0.5, 0.25, 0.494, 0.487, {}),
            Row("prumerge (own count)", 0.414, 0.46, 0.083, 0.357, 0.409, {}),
            Row("fastv @ FLOPs 0.5", 0.45, 0.5, 0.01, 0.611, 0.7, {}, mean_tokens_per_layer=0.505),
            Row("tome @ FLOPs 0.5", 0.72, 0.8, 0.452, 0.501, 0.49, {}, mean_tokens_per_layer=0.452)]
    return leaderboard.Board("zoo:tiny", 36, entries, rows, ["folder: cannot merge here"])


def test_the_leaderboard_writer_keeps_notes_out_of_the_table_and_captions_its_plots(tmp_path):
    pytest.importorskip("matplotlib")
    page = tmp_path / "board.md"
    written = leaderboard.write_page([_fake_board()], page, 600, "tokenpress leaderboard")
    text = page.read_text(encoding="utf-8")
    assert "\n| stack | tokens kept | accuracy | retention | FLOPs ratio | prefill time ratio |\n" in text
    assert "\n| baseline | 100.0% | 90.0% | 100.0% | 1.000 | 1.000 |\n" in text
    assert "\n| alvts 50% ¹ | 50.0% | 85.5% | 95.0% | 0.684 | 0.912 |\n" in text  # sorted by accuracy
    assert text.index("| alvts 50% ¹") < text.index("| tome 50% |") < text.index("| qformer 25% (unfitted) ² |")
    assert text.index("| qformer 25% (unfitted) ²") < text.index("| prumerge (own count) |")
    assert "\n- ¹ shipped weights\n- ² unfitted: no weights\n" in text
    share_table = text.partition("| stack | knob chosen ")[0]
    assert all(line.count("|") == 7 for line in share_table.splitlines() if line.startswith("|"))  # six columns
    budget_rows = [line for line in text.splitlines() if "@ FLOPs" in line]  # by budget, then accuracy
    assert budget_rows == ["| tome @ FLOPs 0.5 | keep_ratio=0.4521 | 45.2% | 72.0% | 80.0% | 0.501 | 0.490 |",
                           "| fastv @ FLOPs 0.5 | keep_ratio=0.01, layers [1] (closest reachable: 0.612) | 50.5% | "
                           "45.0% | 50.0% | 0.611 | 0.700 |"]
    assert "- folder: cannot merge here" in text
    plots = [path for path in written if path.suffix == ".png"]
    assert [path.name for path in plots] == ["tiny-flops.png", "tiny-time.png"]
    for plot in plots:
        image = f"![zoo:tiny: accuracy retained against the {leaderboard.PLOT_AXES[plot.stem.split('-')[-1]][1]}]"
        after = text.partition(f"{image}(board/{plot.name})\n\n")[2]
        assert after.startswith("Colour: the method (legend); shape: what was asked "
                                "(● 50% asked, ■ 25% asked, ◆ own count, ✚ FLOPs 0.5 asked); ★ the uncompressed "
                                "baseline.")


def test_a_leaderboard_update_rebuilds_its_models_sections_and_keeps_the_others(tmp_path):
    pytest.importorskip("matplotlib")
    page = tmp_path / "board.md"
    first, second = _fake_board(), _fake_board()
    second.model = "zoo:other"
    leaderboard.write_page([first, second], page, 600, "tokenpress leaderboard")
    before = leaderboard.page_sections(page.read_text(encoding="utf-8"))
    assert list(before) == ["zoo:tiny", "zoo:other"]
    assert "Measured by `tokenpress leaderboard` on " in before["zoo:tiny"]
    assert "600 test questions." in before["zoo:tiny"]
    first.rows = [dataclasses.replace(row, accuracy=row.accuracy / 2) for row in first.rows]
    leaderboard.write_page([first], page, 300, "tokenpress leaderboard --models zoo:tiny --update", update=True)
    after = leaderboard.page_sections(page.read_text(encoding="utf-8"))
    assert list(after) == ["zoo:tiny", "zoo:other"] and after["zoo:other"] == before["zoo:other"]
    assert "| baseline | 100.0% | 45.0% |" in after["zoo:tiny"] and "300 test questions." in after["zoo:tiny"]
    leaderboard.write_page([first], page, 300, "tokenpress leaderboard")  # without update: only what was run
    assert list(leaderboard.page_sections(page.read_text(encoding="utf-8"))) == ["zoo:tiny"]


def test_the_command_line_defaults_of_the_leaderboard_are_the_modules():
    from tokenpress.tools import cli

    assert tuple(cli.LEADERBOARD_MODELS.split(",")) == leaderboard.DEFAULT_MODELS
    assert tuple(float(b) for b in cli.LEADERBOARD_BUDGETS.split(",")) == leaderboard.BUDGETS


def test_the_committed_leaderboard_page_has_the_writers_layout():
    text = (DOCS / "leaderboard.md").read_text(encoding="utf-8")
    headers = [line for line in text.splitlines() if line.startswith("| stack ")]
    shares = [line for line in headers if line == leaderboard.TABLE_HEADER[0]]
    assert shares and set(headers) <= {leaderboard.TABLE_HEADER[0], leaderboard.BUDGET_HEADER[0]}
    assert text.count("![") == text.count("\nColour: the method (legend); shape: ") == 2 * len(shares)


# --- (3) the site builds --------------------------------------------------------------------------


def test_mkdocs_build_is_strict_clean(tmp_path):
    """``mkdocs build --strict``, as mkdocs.yml says, without ``-q`` (which hides the warnings that make a
    strict build fail): it succeeds and prints no warning."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner (not a warning of the build)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("WARNING")]
    assert not warnings, "\n".join(warnings)
    assert "Documentation built in" in output  # the log was not silenced: an empty warning list means something
    assert elapsed < 60
    api = (tmp_path / "site" / "api" / "tokens" / "index.html").read_text(encoding="utf-8")
    assert 'id="tokenpress.core.tokens.TokenState.keep"' in api  # mkdocstrings rendered the API
    fastv = (tmp_path / "site" / "methods" / "fastv" / "index.html").read_text(encoding="utf-8")
    assert "FastVConfig" in fastv and "keep_ratio" in fastv  # the README and the config reference
    index = (tmp_path / "site" / "methods" / "index.html").read_text(encoding="utf-8")
    for name, method_class in built_in_methods().items():  # every generated page was built and listed
        page = (tmp_path / "site" / "methods" / name / "index.html").read_text(encoding="utf-8")
        assert method_class.Config.__name__ in page, name
        assert f'href="{name}/"' in index, name
    site = tmp_path / "site"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert all(f'href="methods/{name}/"' in home for name in built_in_methods())
    assert all(f"<code>{command.name}" in home for command in _hook("reference_tables").commands())
    getting_started = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert all(f"(entry point {name})" in getting_started for name in built_in_methods())
    testing = (site / "testing" / "index.html").read_text(encoding="utf-8")
    from tokenpress.testing.contract import MethodContract

    assert all(f"<code>{name}</code>" in testing for name in dir(MethodContract) if name.startswith("test_"))
    assert "tokenpress.core.flops.ScoringInput" in (site / "api" / "flops" / "index.html").read_text(encoding="utf-8")
    architecture = (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert '<pre class="mermaid"><code>flowchart' in architecture  # a diagram for mkdocs-material, not a code block
    assert "<code>tokenpress.engine</code>" in architecture and "<!-- moved-modules -->" not in architecture
    escaped = [page.relative_to(site) for page in site.rglob("*.html")
               if re.search(r"<code>[^<]*\\\|", page.read_text(encoding="utf-8"))]
    assert not escaped, f"a literal backslash before a pipe in code on {escaped}"
    assert not (site / "_hooks").exists()  # build tooling is not published

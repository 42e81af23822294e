"""The method contract kit (tokenpress.testing.contract): run on every registered method, and tested itself.

* One contract class per registered method, generated from the registry (a new built-in is covered
  without writing a test), as timm tests every registered model.
* For each check, a deliberately broken method that the kit must fail - on that check alone - run with
  ``pytester`` the way a plugin author runs the kit.
* The pytest plugin (``cuda`` marker, fixtures) and a plugin in its own distribution
  (``contrib/acme-tokenpress``) running the kit on itself.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import traceback
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pluggy
import pytest
import torch

import tokenpress
import tokenpress.core.flops  # noqa: F401  (their Stack classes would differ)
import tokenpress.runtime.attach  # noqa: F401  imported here, so pytester's in-process runs never import a second copy
from tokenpress import DecoderContext, Keep, StageContext, TokenState, keep_count, keep_counts_on_host
from tokenpress.core.select import seeded_uniform, topk_mask
from tokenpress.testing import MethodContract
from tokenpress.testing.contract import SyncRecorder, sync_origin
from tokenpress.testing.families import FAMILIES
from tokenpress.testing.syncs import DataDependentOps

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
ACME = ROOT / "contrib" / "acme-tokenpress"
REGISTERED = sorted(tokenpress.get_registry().methods)


# --- the kit over every registered method -------------------------------------------------------


def _contract_class(name: str) -> type[MethodContract]:
    words = "".join(word.capitalize() for word in re.split(r"[^0-9A-Za-z]+", name))
    cls_name = f"TestContract{words}"
    return type(cls_name, (MethodContract,), {"method": name, "__module__": __name__, "__qualname__": cls_name,
                                               "__doc__": f"The method contract on {name!r}."})


for _name in REGISTERED:
    _cls = _contract_class(_name)
    globals()[_cls.__name__] = _cls
del _name, _cls


def test_every_registered_method_has_a_contract_class() -> None:
    generated = {value.method for value in globals().values()
                 if isinstance(value, type) and issubclass(value, MethodContract) and value.__name__.startswith("Test")}
    assert generated == set(tokenpress.get_registry().methods)
    assert {"fastv", "pool", "random"} <= generated


def test_a_contract_class_must_name_its_method() -> None:
    with pytest.raises(TypeError, match="set `method"):
        type("TestNothing", (MethodContract,), {})


# --- broken methods: each must fail its check, and only that one ---------------------------------


def _keep_first(tokens: TokenState, counts: list[int]) -> TokenState:
    rank = tokens.valid.long().cumsum(-1)
    return tokens.keep(tokens.valid & (rank <= torch.tensor(counts, device=rank.device).unsqueeze(-1)), counts=counts)


class _Selecting(tokenpress.Method):
    """Base of the broken methods: keeps keep_ratio at post_encoder, promises it, identity at 1.0."""

    Config = tokenpress.SelectingConfig
    points = ("post_encoder",)
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.5}

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)

    def counts(self, tokens: TokenState) -> list[int]:
        return keep_counts_on_host(tokens.counts_on_host(), self.config.keep_ratio)


class BrokenPromise(_Selecting):
    """Promises keep_ratio, keeps half of that (below 1.0)."""

    name = "broken-promise"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        ratio = self.config.keep_ratio
        return _keep_first(tokens, keep_counts_on_host(tokens.counts_on_host(), ratio / 2 if ratio < 1 else 1.0))


class BrokenIdentity(_Selecting):
    """Rescales the embeddings it keeps, even at keep_ratio 1.0."""

    name = "broken-identity"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        kept = _keep_first(tokens, self.counts(tokens))
        return kept.replace(kept.embeddings * 1.5)


class BrokenBatch(_Selecting):
    """Draws one (images, tokens) table from a fixed seed: image i's draw depends on its row in the batch."""

    name = "broken-batch"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        generator = torch.Generator().manual_seed(0)
        scores = torch.rand(tokens.num_images, tokens.num_slots, generator=generator).to(tokens.valid.device)
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(self.counts(tokens), device=scores.device)),
                           counts=self.counts(tokens))


class BrokenCache(_Selecting):
    """Decides from every token so far (generated ones included): the first or the last visual tokens."""

    name = "broken-cache"
    points = ("decoder_layer",)

    @tokenpress.hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep:
        visual = context.is_visual
        seen = context.sequence.valid.sum(-1)  # should be the prompt only: this grows at every decoding step
        total = visual.sum(-1)
        keep = keep_count(total, self.config.keep_ratio).to(total.device)
        start = (seen % 2) * (total - keep)
        rank = visual.long().cumsum(-1) - 1
        return Keep(visual & (rank >= start.unsqueeze(-1)) & (rank < (start + keep).unsqueeze(-1)))


class BrokenQuadratic(_Selecting):
    """Ranks tokens by their summed similarity to every other token: an N x N matrix per image."""

    name = "broken-nxn"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        x = tokens.embeddings
        similarity = x @ x.transpose(1, 2)
        scores = similarity.masked_fill(~tokens.valid.unsqueeze(1), 0).sum(-1)
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(self.counts(tokens), device=scores.device)),
                           counts=self.counts(tokens))

    def stage_flops(self, shape: object) -> float:
        return 2.0 * shape.tokens_in ** 2 * shape.encoder_width  # declared: only its memory is wrong


class BrokenPairwise(BrokenQuadratic):
    """Declares a bounded pairwise step (a bipartite matching's |A| x |B| scores, as ToMe does) but forms
    the full N x N matrix: the declared allowance does not cover it."""

    name = "broken-pairwise"

    def pairwise_scores(self, tokens_in: int) -> int:
        return (tokens_in // 2) * (tokens_in - tokens_in // 2)


class BrokenDtype(_Selecting):
    """Returns float32 embeddings whatever the model's dtype."""

    name = "broken-dtype"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        kept = _keep_first(tokens, self.counts(tokens))
        return kept.replace(kept.embeddings.float())


class BrokenSeed(_Selecting):
    """Seeds its (per-sample, batch-independent) draws from the OS at setup: each attachment differs."""

    name = "broken-seed"

    def setup(self, model_info: object) -> None:
        self.seed = random.SystemRandom().randrange(2**31)

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        device = tokens.valid.device
        scores = torch.stack([seeded_uniform(context.random_key(i, self.seed),
                                             tokens.num_slots, device) for i in range(tokens.num_images)])
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(self.counts(tokens), device=device)),
                           counts=self.counts(tokens))


class BrokenGlobalRandom(BrokenSeed):
    """Seeds its draws from torch's global generator at setup: the same under the same global seed (the
    kit used to reseed it identically before each run, and passed it), never from its own parameters."""

    name = "broken-global-random"

    def setup(self, model_info: object) -> None:
        self.seed = int(torch.randint(2**31, ()))


class BrokenGrid(tokenpress.Method):
    """Average-pools 2x2 windows but declares that the grid keeps its size."""

    name = "broken-grid"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        def pool(grid: torch.Tensor) -> torch.Tensor:
            pooled = torch.nn.functional.avg_pool2d(grid.permute(0, 3, 1, 2), 2, ceil_mode=True)
            return pooled.permute(0, 2, 3, 1)

        return tokens.regrid(pool, 2)

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return height, width


class BrokenFlops(_Selecting):
    """Scores tokens with a matrix product against their mean and declares no cost for it."""

    name = "broken-flops"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        x = tokens.embeddings
        scores = (x @ x.mean(1, keepdim=True).transpose(1, 2)).squeeze(-1)
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(self.counts(tokens), device=scores.device)),
                           counts=self.counts(tokens))


class BrokenSync(_Selecting):
    """Reads its counts back from the device (``.tolist()``): the GPU waits for the host at every call."""

    name = "broken-sync"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        return _keep_first(tokens, keep_count(tokens.counts(), self.config.keep_ratio).tolist())


class BrokenAutograd(_Selecting):
    """Writes the tokens it keeps into a reused buffer (``out=``): fine under ``no_grad``, an error
    when the model runs with autograd on."""

    name = "broken-autograd"

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        kept = _keep_first(tokens, self.counts(tokens))
        return kept.replace(torch.mul(kept.embeddings, 1.0, out=torch.empty_like(kept.embeddings)))


class _Provides:
    """A plugin object registering one method class."""

    def __init__(self, method_class: type[tokenpress.Method]) -> None:
        self.method_class = method_class

    @tokenpress.hookimpl
    def tokenpress_register_methods(self) -> list[type[tokenpress.Method]]:
        return [self.method_class]


CHECKS = ("test_tokens_match_promise", "test_grid_matches_expected_grid", "test_declared_flops_match_the_counter",
          "test_identity_at_ratio_one", "test_batch_invariance",
          "test_cache_and_no_cache_agree", "test_no_quadratic_allocations", "test_dtype_and_device_kept",
          "test_weights_round_trip_and_follow_the_model", "test_deterministic_under_seed", "test_no_host_device_sync",
          "test_autograd_on_gives_the_same_logits")


@pytest.fixture
def restore_registry() -> Iterator[tokenpress.core.registry.Registry]:
    """The process registry, rebuilt from the entry points afterwards (drops what a test registered)."""
    yield tokenpress.get_registry()
    registry = tokenpress.get_registry(reload=True)
    assert not any(name.startswith("broken-") for name in registry.methods)


def _author_test_file(pytester: pytest.Pytester, method: str) -> None:
    """What a plugin author writes, restricted to LLaVA to keep the kit's own tests fast."""
    pytester.makepyfile(test_author=f"""
        from tokenpress.testing import MethodContract


        class TestAuthor(MethodContract):
            method = {method!r}
            families = ("llava",)
        """)


#: Checks every broken method skips: it has no weights, and (but broken-grid) does not re-grid.
SKIPPED_BY_BROKEN = 2


@pytest.mark.parametrize(("method_class", "check", "message", "skipped"), [
    pytest.param(method_class, check, message, skipped, id=method_class.name)
    for method_class, check, message, skipped in [
        (BrokenPromise, "test_tokens_match_promise", "does not keep what it promises", SKIPPED_BY_BROKEN),
        (BrokenIdentity, "test_identity_at_ratio_one", "identity_params {'keep_ratio': 1.0} changes the logits",
         SKIPPED_BY_BROKEN),
        (BrokenBatch, "test_batch_invariance", "differ from the same sample run alone", SKIPPED_BY_BROKEN),
        (BrokenCache, "test_cache_and_no_cache_agree", "greedy generate with the KV cache gave", SKIPPED_BY_BROKEN),
        (BrokenQuadratic, "test_no_quadratic_allocations", "x N attention or similarity matrix", SKIPPED_BY_BROKEN),
        (BrokenPairwise, "test_no_quadratic_allocations", "beyond its declared pairwise scores", SKIPPED_BY_BROKEN),
        (BrokenDtype, "test_dtype_and_device_kept", "returned torch.float32 embeddings (received torch.float64)",
         SKIPPED_BY_BROKEN),
        (BrokenSeed, "test_deterministic_under_seed", "is not deterministic: two runs selected", SKIPPED_BY_BROKEN),
        (BrokenGlobalRandom, "test_deterministic_under_seed", "draws from the global random generators",
         SKIPPED_BY_BROKEN),
        # no weights, no promise, no identity setting
        (BrokenGrid, "test_grid_matches_expected_grid", "6x6 became 3x3, expected_grid says 6x6", 3),
        (BrokenFlops, "test_declared_flops_match_the_counter", "the FLOPs model with the method's declared costs",
         SKIPPED_BY_BROKEN),
        (BrokenSync, "test_no_host_device_sync", "Tensor.tolist() (a device-to-host copy on CUDA)", SKIPPED_BY_BROKEN),
        (BrokenAutograd, "test_autograd_on_gives_the_same_logits", "functions with out=... arguments don't support",
         SKIPPED_BY_BROKEN),
    ]
])
def test_the_kit_fails_a_broken_method_on_its_check_only(pytester: pytest.Pytester, restore_registry,
                                                         method_class: type[tokenpress.Method], check: str,
                                                         message: str, skipped: int) -> None:
    restore_registry.register_plugin(_Provides(method_class), name=f"plugin-{method_class.name}")
    _author_test_file(pytester, method_class.name)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rfs")
    result.assert_outcomes(failed=1, passed=len(CHECKS) - 1 - skipped, skipped=skipped)
    result.stdout.fnmatch_lines([f"FAILED test_author.py::TestAuthor::{check}?llava-{method_class.name}?*"])
    assert message in result.stdout.str(), result.stdout.str()


def test_the_stack_under_test_takes_default_layers_positions_and_neighbours() -> None:
    """``layers = None`` leaves a method with default layers to choose them (the kit exercises them);
    ``positions`` and ``stages_before``/``stages_after`` build the stack around the method's stage."""
    from tokenpress.testing import MethodContract

    class Defaults(MethodContract):
        method = "sparsevlm"

    class Explicit(MethodContract):
        method = "fastv"
        layers = (2,)
        positions = "compact"
        stages_before = ({"method": "pool", "params": {"kernel": 2}},)
        stages_after = ({"method": "random", "at": "decoder_layer", "layers": [3]},)

    class NoDefaults(MethodContract):
        method = "random"
        point = "decoder_layer"

    assert "layers" not in Defaults().stack("sparsevlm")["stages"][0]
    assert tokenpress.load_stack(Defaults().stack("sparsevlm")).stages[0].layers == ()  # resolved on the model
    assert NoDefaults().stack("random")["stages"][0]["layers"] == [1]  # a decoder stage without default layers
    stack = Explicit().stack("fastv")
    assert stack["positions"] == "compact" and Explicit().stage_index() == 1
    assert [(stage["method"], stage.get("layers")) for stage in stack["stages"]] == [
        ("pool", None), ("fastv", [2]), ("random", [3])]


def test_a_method_inside_a_compact_stack_passes_the_kit(pytester: pytest.Pytester) -> None:
    """A plugin author tests FastV after pooling with compact positions: the checks observe FastV's calls
    only, and every one passes (weights and re-grid checks skip: it has neither)."""
    pytester.makepyfile(test_author="""
        from tokenpress.testing import MethodContract


        class TestAuthor(MethodContract):
            method = "fastv"
            families = ("llava",)
            positions = "compact"
            stages_before = ({"method": "pool", "params": {"kernel": 2}},)
        """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rfs")
    result.assert_outcomes(passed=len(CHECKS) - 2, skipped=2)


class ProbeScore(_Selecting):
    """Scores each token with a fixed probe as wide as the tokens it receives (encoder space at post_encoder,
    LLM space at query_conditioned), keeps the best: its own FLOPs depend on the point's width."""

    name = "probe-score"
    points = ("post_encoder", "query_conditioned")

    def _keep(self, tokens: TokenState) -> TokenState:
        width = tokens.embeddings.shape[-1]
        probe = torch.linspace(-1, 1, width, dtype=tokens.embeddings.dtype, device=tokens.embeddings.device)
        scores = (tokens.embeddings @ probe.unsqueeze(-1)).squeeze(-1)
        counts = self.counts(tokens)
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(counts, device=scores.device)), counts=counts)

    @tokenpress.hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._keep(tokens)

    @tokenpress.hookimpl
    def query_conditioned(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._keep(tokens)

    def stage_flops(self, shape: object) -> float:
        return 2.0 * shape.tokens_in * shape.width_in  # the probe's product, at the incoming width


@pytest.mark.parametrize("point", ["post_encoder", "query_conditioned"])
def test_a_method_offered_at_two_points_declares_its_flops_at_each(pytester: pytest.Pytester, restore_registry,
                                                                   point: str) -> None:
    """``stage_flops`` learns where the stage runs and how wide its tokens arrive (``StageShape.width_in``):
    a method offered before and after the projector matches torch's counter at both points."""
    restore_registry.register_plugin(_Provides(ProbeScore), name="plugin-probe-score")
    pytester.makepyfile(test_author=f"""
        from tokenpress.testing import MethodContract


        class TestAuthor(MethodContract):
            method = "probe-score"
            point = {point!r}
            families = ("llava", "qwen2.5-vl")
        """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "declared_flops")
    result.assert_outcomes(passed=2)


def test_the_kit_fails_an_unregistered_method_clearly(pytester: pytest.Pytester) -> None:
    _author_test_file(pytester, "acme-not-installed")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=len(CHECKS))
    result.stdout.fnmatch_lines(["*method 'acme-not-installed' is not registered*tokenpress.plugins*"])


def test_syncs_are_blamed_on_the_innermost_frame_outside_torch(tmp_path: Path) -> None:
    torch_file = str(Path(torch.__file__).parent / "functional.py")
    core_file = str(Path(tokenpress.__file__).parent / "tokens.py")
    plugin_file = str(tmp_path / "acme_tokenpress.py")

    def frame(filename: str, line: int) -> traceback.FrameSummary:
        return traceback.FrameSummary(filename, line, "f")

    # outermost first, as traceback.extract_stack() gives them
    assert sync_origin([frame(plugin_file, 3), frame(core_file, 7), frame(torch_file, 1)]) == ("core", f"{core_file}:7")
    assert sync_origin([frame(core_file, 7), frame(plugin_file, 3), frame(torch_file, 1)]) == ("method",
                                                                                               f"{plugin_file}:3")
    # pluggy's caller sits between the core and the method's hook: it is neither
    pluggy_file = str(Path(pluggy.__file__).parent / "_callers.py")
    assert sync_origin([frame(core_file, 7), frame(pluggy_file, 116), frame(torch_file, 1)]) == ("core",
                                                                                                f"{core_file}:7")


def test_data_dependent_ops_are_the_ones_that_wait_for_a_gpu() -> None:
    """On a CPU, every operation that synchronises on CUDA is recorded, nothing else, and the
    wrapped ``Tensor.tolist`` is put back."""
    values = torch.arange(6)
    original = torch.Tensor.tolist
    reads = [lambda: values[2].item(), lambda: int(values[1]), lambda: bool(values[0] > 1), lambda: values.tolist(),
             lambda: values[values > 2], lambda: (values > 2).nonzero(),
             lambda: torch.repeat_interleave(values, values), lambda: values.unique(), lambda: values.bincount()]
    for read in reads:
        with DataDependentOps() as recorder:
            read()
        assert len(recorder.events) >= 1
        assert all(event.origin == "method" and __file__ in event.where for event in recorder.events)
    with DataDependentOps() as recorder:  # shapes known on the host: nothing waits
        torch.topk(values.float(), 3)
        torch.gather(values, 0, torch.tensor([1, 2]))
        torch.repeat_interleave(values, values, output_size=15)
        values.sum(-1)
        torch.where(values > 2, values, 0)
    assert recorder.events == []
    assert torch.Tensor.tolist is original


def test_the_sync_debug_notice_is_not_a_synchronisation() -> None:
    """torch's one-time "prototype feature" warning was blamed on the first method to run (seen on an H100)."""
    recorder = SyncRecorder()
    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
              "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)")
    passed_on: list[str] = []
    recorder._original = lambda message, *rest: passed_on.append(str(message))
    recorder._show(UserWarning(notice), UserWarning, "x.py", 1)
    recorder._show(UserWarning("called a synchronizing CUDA operation"), UserWarning, "x.py", 1)
    assert [event.message for event in recorder.events] == ["called a synchronizing CUDA operation"]
    assert passed_on == [notice]  # shown as an ordinary warning


# --- the pytest plugin --------------------------------------------------------------------------


def test_the_pytest_plugin_is_an_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("tokenpress") == "tokenpress.testing.pytest_plugin", (
        "reinstall tokenpress (pip install -e . --no-deps) to register its pytest11 entry point")


def test_plugin_fixtures_and_cuda_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fixtures="""
        import pytest


        def test_family(tokenpress_family, tiny_model_factory):
            assert tiny_model_factory(tokenpress_family.name) is tokenpress_family.model
            batch = tokenpress_family.batch(2)
            assert tokenpress_family.model(**batch).logits.shape[0] == 2


        @pytest.mark.cuda
        def test_on_the_gpu():
            import torch

            assert torch.cuda.is_available()
        """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", "-v")
    cuda = torch.cuda.is_available()
    result.assert_outcomes(passed=len(FAMILIES) + cuda, skipped=int(not cuda))
    result.stdout.fnmatch_lines([f"*test_family?{name}? PASSED*" for name in FAMILIES])


# --- a plugin in its own distribution runs the kit on itself ------------------------------------


def test_a_separate_distribution_runs_the_kit_on_itself(tmp_path: Path) -> None:
    """contrib/acme-tokenpress, 'installed' on PYTHONPATH with the entry points its pyproject declares."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = shutil.copytree(ACME, tmp_path / "acme-tokenpress", ignore=shutil.ignore_patterns("__pycache__"))
    metadata = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = metadata["entry-points"]
    assert groups["tokenpress.plugins"] == {"acme": "acme_tokenpress"}
    info = project / f"{metadata['name'].replace('-', '_')}-{metadata['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {metadata['name']}\nVersion: {metadata['version']}\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
        for group, points in groups.items()), encoding="utf-8")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TOKENPRESS_", "PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD"))}
    env.update(PYTHONPATH=str(project), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2")
    completed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests"],
                               cwd=project, env=env, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    # acme-keepfirst has no weights and does not re-grid: those two checks skip
    checks = len(CHECKS) - 2
    assert f"{checks * len(FAMILIES)} passed" in output, output

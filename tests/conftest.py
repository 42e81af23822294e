"""Shared fixtures: tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def llava_eager():
    from tokenpress.testing import tiny_llava

    return tiny_llava("eager")


@pytest.fixture(scope="session")
def llava_sdpa():
    from tokenpress.testing import tiny_llava

    return tiny_llava("sdpa")


@pytest.fixture(params=["eager", "sdpa"])
def llava(request, llava_eager, llava_sdpa):
    return llava_eager if request.param == "eager" else llava_sdpa


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The tiny LLaVA saved as a checkpoint folder with its processor, once per session."""
    from tokenpress.testing.models import save_tiny_llava_checkpoint

    folder = tmp_path_factory.getbasetemp() / "tiny-llava-checkpoint"
    if not (folder / "config.json").exists():
        save_tiny_llava_checkpoint(folder)
    return folder


@pytest.fixture
def register_methods():
    """Register test method classes for one test: ``register_methods(MethodA, MethodB)``; the registry
    is rebuilt from the entry points afterwards."""
    import tokenpress

    def register(*classes):
        class Plugin:
            @tokenpress.hookimpl
            def tokenpress_register_methods(self):
                return list(classes)

        tokenpress.get_registry().register_plugin(Plugin(), name="test-" + "-".join(c.name for c in classes))

    yield register
    tokenpress.get_registry(reload=True)


@pytest.fixture
def recorded_tokens(register_methods):
    """Registers the test method ``test-record-tokens`` (at ``post_encoder``: records the token state it
    receives, changes nothing) for one test; yields the list of states it saw."""
    import tokenpress

    seen: list = []

    class RecordTokens(tokenpress.Method):
        name = "test-record-tokens"
        Config = tokenpress.MethodConfig
        points = ("post_encoder",)

        @tokenpress.hookimpl
        def post_encoder(self, tokens, context):
            seen.append(tokens)
            return tokens

    register_methods(RecordTokens)
    return seen

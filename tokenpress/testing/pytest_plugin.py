"""tokenpress's pytest plugin, loaded through the ``pytest11`` entry point wherever tokenpress is installed.

It registers the ``cuda`` marker (tests marked with it are skipped without a CUDA device) and gives
plugin authors two fixtures without any import:

* ``tokenpress_family`` - a :class:`~tokenpress.testing.contract.FamilyCase` (tiny model + batch
  builders), a test using it runs once per family of ``tokenpress.testing.families.FAMILIES``;
* ``tiny_model_factory`` - :func:`~tokenpress.testing.contract.tiny_model`, the session's cached tiny
  models: ``tiny_model_factory("llava", dtype=torch.float64)``.

It loads into every pytest session of an environment with tokenpress, so it imports neither torch nor
tokenpress until a test asks for one of these.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.register_assert_rewrite("tokenpress.testing.contract")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tokenpress_family" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if "tokenpress_family" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return  # the test chose its families itself
    from tokenpress.testing.families import FAMILIES

    metafunc.parametrize("tokenpress_family", list(FAMILIES), indirect=True, scope="session")


@pytest.fixture(scope="session")
def tokenpress_family(request: pytest.FixtureRequest) -> Any:
    """A tiny model family (:class:`~tokenpress.testing.contract.FamilyCase`), one per FAMILIES entry."""
    from tokenpress.testing.contract import FamilyCase, tiny_model
    from tokenpress.testing.families import FAMILIES

    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError("tokenpress_family is parametrized over FAMILIES by the tokenpress plugin")
    return FamilyCase(name, FAMILIES[name], tiny_model(name))


@pytest.fixture(scope="session")
def tiny_model_factory() -> Any:
    """``tiny_model_factory(family, attn_implementation="sdpa", dtype=None, device="cpu")``: a cached tiny model."""
    from tokenpress.testing.contract import tiny_model

    return tiny_model

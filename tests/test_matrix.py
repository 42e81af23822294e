"""The method x family matrix (tokenpress.testing.matrix): every registered method on every registered family
runs or refuses in one sentence, never crashes, and leaves the model untouched; at least 95% of the cells run;
the documentation's page is this run's; the same suite runs on a third party's family registered by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tokenpress
from tokenpress.testing import matrix
from tokenpress.testing.families import FAMILIES, register_family

PAGE = Path(__file__).resolve().parent.parent / "docs" / "methods" / "matrix.md"


@pytest.fixture(scope="module")
def cells() -> list[matrix.Cell]:
    return matrix.run_matrix()


def test_every_cell_runs_or_refuses_in_one_sentence_and_leaves_the_model_untouched(cells) -> None:
    crashed = [f"{cell.method} on {cell.family}: {cell.message}" for cell in cells if cell.outcome == matrix.CRASHED]
    assert not crashed, "crashes:\n" + "\n".join(crashed)
    touched = [f"{cell.method} on {cell.family}" for cell in cells if not cell.untouched]
    assert not touched, f"the model was changed by: {touched}"
    for cell in cells:
        if cell.outcome == matrix.REFUSED:
            assert cell.message and len(cell.message) < 400, cell


def test_at_least_95_percent_of_the_cells_run(cells) -> None:
    methods = {cell.method for cell in cells}
    families = {cell.family for cell in cells}
    assert len(families) >= 7 and len(methods) >= 13
    ran = sum(cell.outcome == matrix.RUNS for cell in cells)
    assert ran >= 0.95 * len(cells), matrix.render(cells)


def test_the_documentation_page_is_this_run(cells) -> None:
    """docs/methods/matrix.md is what this run renders (rewrite it with TOKENPRESS_WRITE_MATRIX=1)."""
    rendered = matrix.render(cells)
    if os.environ.get("TOKENPRESS_WRITE_MATRIX"):
        PAGE.write_text(rendered, encoding="utf-8")
    assert PAGE.read_text(encoding="utf-8") == rendered, (
        "docs/methods/matrix.md is out of date: run `python -m tokenpress.testing.matrix docs/methods/matrix.md`")


def test_a_third_party_family_registered_by_hand_runs_the_same_suite(register_methods) -> None:
    """A family outside tokenpress - an adapter registered through the hook and its tiny-model record through
    register_family - gets the same matrix as the built-in ones."""
    from tokenpress.families.llava.adapter import LlavaAdapter
    from tokenpress.families.llava.testbed import LLAVA
    from tokenpress.families.testbed import Family

    class AcmeAdapter(LlavaAdapter):
        family = "acme-llava"

        @classmethod
        def supports(cls, model) -> bool:
            return getattr(model, "acme", False)

    def build(attn_implementation: str):
        model = LLAVA.build(attn_implementation)
        model.acme = True
        return model

    class AcmePlugin:
        @tokenpress.hookimpl
        def tokenpress_register_adapters(self):
            return [AcmeAdapter]

    tokenpress.get_registry().register_plugin(AcmePlugin(), name="acme-family")
    register_family(Family("acme-llava", build, LLAVA.batch, LLAVA.select))
    try:
        cells = matrix.run_matrix(families=["acme-llava"])
        assert {cell.family for cell in cells} == {"acme-llava"}
        assert not [cell for cell in cells if cell.outcome == matrix.CRASHED or not cell.untouched]
        builtin = {cell.method: cell.outcome for cell in matrix.run_matrix(families=["llava"])}
        assert {cell.method: cell.outcome for cell in cells} == builtin
    finally:
        FAMILIES.pop("acme-llava", None)
        tokenpress.get_registry(reload=True)

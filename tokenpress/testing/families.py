"""Tiny models of every supported family, with inputs, for suites that run over all families.

Each family folder holds its tiny test model and its record (``tokenpress.families.<family>.testbed``);
its adapter names the record (``ModelAdapter.test_family``, ``"module:attribute"``, imported here only):
:data:`FAMILIES` holds the records the registered adapters name. A third-party family does the same,
or adds its record with :func:`register_family` (from its own test setup).
"""

from __future__ import annotations

from tokenpress.core.registry import get_registry
from tokenpress.families.testbed import Family, Prompt, ScaledInputs, record_of, sample_prompts

__all__ = ["FAMILIES", "Family", "ScaledInputs", "prompts", "register_family"]


def _named_by_adapters() -> dict[str, Family]:
    """The records the registered adapters name, in their order (the first one for a name wins)."""
    families: dict[str, Family] = {}
    for adapter in get_registry().adapters:
        family = record_of(adapter)
        if family is not None:
            families.setdefault(family.name, family)
    return families


#: Family name -> its record: those the registered adapters name, then those added by register_family.
FAMILIES: dict[str, Family] = _named_by_adapters()


def register_family(family: Family) -> None:
    """Make a tiny model of a (third-party) family available to the shared suites."""
    FAMILIES[family.name] = family


def prompts(count: int = 3, seed: int = 0) -> list[Prompt]:
    return sample_prompts(count, seed)

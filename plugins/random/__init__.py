"""random: keep a seeded random subset of the visual tokens - the baseline studies find hard to beat."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.random.method import RandomKeep


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [RandomKeep]


__all__ = ["RandomKeep"]

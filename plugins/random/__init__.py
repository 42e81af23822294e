"""random: keep a seeded random subset of the visual tokens - the baseline studies find hard to beat."""

from __future__ import annotations

from tokenpress_plugins.random.method import RandomKeep

from tokenpress import Method, hookimpl


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [RandomKeep]


__all__ = ["RandomKeep"]

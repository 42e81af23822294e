"""Old import paths of modules that moved into the layers (0.2): ``import tokenpress.attach`` keeps working
for one release, with a ``DeprecationWarning`` naming the new path (``tokenpress.runtime.attach``).

A finder at the end of ``sys.meta_path`` answers only for the old names (a module still at its old path
is found first); the old module is a thin alias whose attributes are the new module's.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: Old module path -> where it lives now (several modules: its names were split among them, first one first).
MOVED: dict[str, str | tuple[str, ...]] = {
    **{f"tokenpress.{name}": f"tokenpress.core.{name}" for name in (
        "errors", "hookspecs", "method", "tokens", "decisions", "signals", "select", "matching", "stack", "registry",
        "flops", "observers", "weights")},
    **{f"tokenpress.{name}": f"tokenpress.runtime.{name}" for name in (
        "attach", "prefill", "context", "scorer", "encoder", "sequence", "cache", "compat", "loading")},
    "tokenpress.engine": "tokenpress.runtime.interception",
    "tokenpress.adapters": ("tokenpress.runtime.adapter", "tokenpress.families.llava", "tokenpress.families.llava_next",
                            "tokenpress.families.qwen2_5_vl"),
    "tokenpress.adapters.base": "tokenpress.runtime.adapter",
    "tokenpress.adapters.llava": "tokenpress.families.llava",
    "tokenpress.adapters.llava_next": "tokenpress.families.llava_next",
    "tokenpress.adapters.qwen2_5_vl": "tokenpress.families.qwen2_5_vl",
    **{f"tokenpress.{name}": f"tokenpress.measure.{name}" for name in (
        "profiling", "bench", "evaluate", "leaderboard")},
    **{f"tokenpress.{name}": f"tokenpress.tools.{name}" for name in (
        "cli", "cli_bench", "viz", "fit", "calibration", "outputs")},
    "tokenpress.zoo.train": "tokenpress.tools.zoo_train",
    "tokenpress.zoo.card": "tokenpress.tools.zoo_card",
}


def _targets(old: str) -> tuple[str, ...]:
    new = MOVED[old]
    return (new,) if isinstance(new, str) else new


class _Alias(types.ModuleType):
    """An old module path: every attribute read goes to the module(s) it moved to."""

    def __getattr__(self, name: str) -> Any:
        for target in _targets(self.__name__):
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for target in _targets(self.__name__) for name in dir(importlib.import_module(target))})


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` (after every other finder) and loads them as aliases."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        is_package = any(other.startswith(fullname + ".") for other in MOVED)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Alias(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        where = " and ".join(_targets(module.__name__))
        warnings.warn(f"{module.__name__} moved to {where}; import it from there (the old path goes away in the "
                      "next release)", DeprecationWarning, stacklevel=2)


def install() -> None:
    """Put the finder at the end of ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())

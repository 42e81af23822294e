"""The registry of methods and model adapters, filled by plugins through pluggy.

Plugins are modules (or objects) implementing the registration hooks of
:mod:`tokenpress.core.hookspecs`. Methods are found through the ``tokenpress.plugins`` entry-point group
- built-in methods exactly like third-party ones - and model families through ``tokenpress.families``
(the built-in families are entry points too: the registry imports none of them). As in pytest:

* ``TOKENPRESS_DISABLE_PLUGIN_AUTOLOAD=1`` loads no ``tokenpress.plugins`` entry point (families still
  load); ``TOKENPRESS_PLUGINS=a,b`` then names the entry points (or importable modules) to load anyway;
* ``TOKENPRESS_BLOCK_PLUGINS=a,b`` (or ``get_registry(block=...)``) blocks entry points of either group
  by name.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from tokenpress.core import hookspecs, observers
from tokenpress.core.errors import PluginError
from tokenpress.core.method import APPROACHES, POINTS, Method

ENTRY_POINT_GROUP = "tokenpress.plugins"
#: Model families (adapters), built-in and third-party: always loaded (autoload concerns methods), blockable.
FAMILY_GROUP = "tokenpress.families"
CORE_ORIGIN = "tokenpress (core)"


@dataclass
class Registry:
    """Registered methods and adapters, and the plugin manager that produced them."""

    plugin_manager: pluggy.PluginManager
    methods: dict[str, type[Method]] = field(default_factory=dict)
    adapters: list[type] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # method or adapter name -> where it came from
    blocked: tuple[str, ...] = ()

    def register_plugin(self, plugin: ModuleType | object, name: str | None = None, origin: str | None = None) -> None:
        """Register a plugin module/object by hand and add what it provides."""
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if plugin_name in self.blocked or self.plugin_manager.is_blocked(plugin_name):
            return
        if self.plugin_manager.is_registered(plugin) or self.plugin_manager.has_plugin(plugin_name):
            return
        self.plugin_manager.register(plugin, name=plugin_name)
        self._collect(plugin, origin or plugin_name)

    def _collect(self, plugin: object, origin: str) -> None:
        register_methods = getattr(plugin, "tokenpress_register_methods", None)
        for method_class in (register_methods() if register_methods else None) or []:
            self._add_method(method_class, origin)
        register_adapters = getattr(plugin, "tokenpress_register_adapters", None)
        for adapter_class in (register_adapters() if register_adapters else None) or []:
            if adapter_class not in self.adapters:
                self.adapters.append(adapter_class)
                self.origins[f"adapter:{adapter_class.family}"] = origin

    def _add_method(self, method_class: type[Method], origin: str) -> None:
        name = getattr(method_class, "name", "")
        if not isinstance(method_class, type) or not issubclass(method_class, Method) or not name:
            raise PluginError(f"{origin}: registered {method_class!r}, which is not a named tokenpress.Method subclass")
        if name in self.methods and self.methods[name] is not method_class:
            raise PluginError(
                f"method name {name!r} is registered twice: by {self.origins[name]} and by {origin}"
            )
        unknown = [p for p in method_class.points if p not in POINTS]
        if not method_class.points or unknown:
            raise PluginError(f"{origin}: method {name!r} declares unknown points {unknown or '(none)'}")
        if method_class.approach and method_class.approach not in APPROACHES:
            raise PluginError(f"{origin}: method {name!r} declares approach {method_class.approach!r}, not one of "
                              f"{', '.join(APPROACHES)} (or none)")
        missing = [p for p in method_class.points if not callable(getattr(method_class, p, None))]
        if missing:
            raise PluginError(f"{origin}: method {name!r} supports {missing} but has no hook of that name")
        self.methods[name] = method_class
        self.origins[name] = origin

    def method(self, name: str) -> type[Method]:
        return self.methods[name]


def _split_env(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


def _origin(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return f"{dist.name} {dist.version} (entry point {ep.name})"
    return f"entry point {ep.name}"


def _load_group(registry: Registry, group: str, blocked: tuple[str, ...], load: Any) -> dict[str, Any]:
    """Register the entry points of ``group`` that are not blocked and that ``load(name)`` wants, in name
    order; returns every entry point of the group by name."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=group):
        other = found.setdefault(ep.name, ep)
        if other.value != ep.value:  # one would silently shadow the other (and blocking hits both)
            raise PluginError(f"plugin name {ep.name!r} is declared twice in the {group!r} entry-point "
                              f"group: by {_origin(other)} and by {_origin(ep)}; uninstall one of them")
    for name, ep in sorted(found.items()):
        if name in blocked or not load(name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not hide the others
            raise PluginError(f"plugin {name!r} ({_origin(ep)}) failed to load: {exc}") from exc
        registry.register_plugin(plugin, name=name, origin=_origin(ep))
    return found


def build_registry(autoload: bool | None = None, block: tuple[str, ...] = ()) -> Registry:
    """Make a fresh registry: core adapters' hook specs, then entry-point plugins unless disabled."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    blocked = tuple(block) + _split_env("TOKENPRESS_BLOCK_PLUGINS")
    for name in blocked:
        manager.set_blocked(name)
    registry = Registry(manager, blocked=blocked)

    # The core's own piece (the default stage runner), then the model families - the built-in ones are
    # entry points like a third party's, so nothing here imports them - then the plugins. Methods,
    # built-in ones included, only ever come from plugins.
    registry.register_plugin(observers, name="tokenpress.core.observers", origin=CORE_ORIGIN)
    _load_group(registry, FAMILY_GROUP, blocked, lambda name: True)

    if autoload is None:
        autoload = os.environ.get("TOKENPRESS_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    wanted = set(_split_env("TOKENPRESS_PLUGINS"))
    found = _load_group(registry, ENTRY_POINT_GROUP, blocked, lambda name: autoload or name in wanted)
    for module_name in sorted(wanted - set(found)):
        if module_name in blocked:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"TOKENPRESS_PLUGINS names {module_name!r}, which is neither an entry point "
                              f"nor an importable module") from exc
        registry.register_plugin(module, name=module_name, origin=f"module {module_name}")
    return registry


_REGISTRY: Registry | None = None


def get_registry(*, reload: bool = False, block: tuple[str, ...] = ()) -> Registry:
    """The process-wide registry (built on first use; ``reload=True`` or a ``block`` list rebuilds it)."""
    global _REGISTRY
    if _REGISTRY is None or reload or block:
        _REGISTRY = build_registry(block=block)
    return _REGISTRY


def register_plugin(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a plugin module or object in the process-wide registry (no entry point needed)."""
    get_registry().register_plugin(plugin, name=name)


def list_methods() -> list[str]:
    return sorted(get_registry().methods)

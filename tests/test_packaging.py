"""Every built-in plugin folder is packaged and declared as an entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_plugin_folder_is_packaged_and_registered():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(config["tool"]["setuptools"]["packages"])
    entry_points = config["project"]["entry-points"]["tokenpress.plugins"]
    folders = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())
    assert folders, "no plugin folders found"
    for folder in folders:
        assert f"tokenpress_plugins.{folder}" in packages, f"plugins/{folder} is not listed in pyproject packages"
        assert f"tokenpress_plugins.{folder}" in entry_points.values(), f"plugins/{folder} has no entry point"
        assert (ROOT / "plugins" / folder / "README.md").exists(), f"plugins/{folder} has no doc page"


def test_every_core_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(config["tool"]["setuptools"]["packages"])
    for init in (ROOT / "tokenpress").rglob("__init__.py"):
        name = ".".join(init.parent.relative_to(ROOT).parts)
        assert name in packages, f"{name} is missing from pyproject packages"


def test_every_family_folder_is_registered_through_its_entry_point():
    """A built-in family is registered like a third party's (nothing in the core imports it)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry_points = config["project"]["entry-points"]["tokenpress.families"]
    folders = sorted(p.name for p in (ROOT / "tokenpress" / "families").iterdir() if (p / "__init__.py").exists())
    assert folders, "no family folders found"
    assert sorted(entry_points.values()) == [f"tokenpress.families.{folder}" for folder in folders]
    for folder in folders:
        assert {"adapter.py", "costs.py", "testbed.py"} <= {p.name for p in (ROOT / "tokenpress" / "families" /
                                                                            folder).iterdir()}, folder

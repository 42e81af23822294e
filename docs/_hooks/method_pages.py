"""mkdocs hook: every built-in method's page, nav entry and row of the methods table, made from its
plugin folder (its ``README.md`` and its ``Config`` reference) and its registered ``Method`` class.

The table replaces ``<!-- methods-table -->`` on any page (the methods index and the home page), its
links relative to that page.

A new built-in method is its folder under ``plugins/`` and one entry-point line: the docs need no
file of their own. A method that wants more than its README on its page adds
``docs/methods/NAME.md`` by hand; that file is used instead of the generated one.
"""

from __future__ import annotations

import posixpath
from typing import Any

from mkdocs.structure.files import File, Files

import tokenpress

SECTION = "Methods"
TABLE_MARKER = "<!-- methods-table -->"


def built_in_methods() -> dict[str, type[tokenpress.Method]]:
    """The registered methods that ship with tokenpress (those of the ``tokenpress_plugins`` package)."""
    methods = tokenpress.get_registry().methods
    return {name: methods[name] for name in sorted(methods)
            if methods[name].__module__.startswith("tokenpress_plugins.")}


def plugin_folder(method_class: type[tokenpress.Method]) -> str:
    """``plugins/<folder>`` of a built-in method (``tokenpress_plugins.<folder>.*``)."""
    return method_class.__module__.split(".")[1]


def page_source(method_class: type[tokenpress.Method]) -> str:
    """The Markdown of a method's page: its plugin's README, then the reference of its parameters."""
    config = method_class.Config
    return (f'--8<-- "plugins/{plugin_folder(method_class)}/README.md"\n\n'
            "## Parameters reference\n\n"
            f"::: {config.__module__}.{config.__qualname__}\n"
            "    options:\n"
            "      show_root_heading: true\n"
            "      show_root_full_path: false\n"
            "      inherited_members: true\n"
            "      heading_level: 3\n")


APPROACH_HEADINGS = {
    "transform": "transform-based",
    "similarity": "similarity-based",
    "attention": "attention-based",
    "query": "query-based",
    "": "baseline",
}


def methods_table(page_folder: str = "methods") -> str:
    """One row per built-in method, grouped by the survey's families (``Method.approach``) and by year
    within each: its page (linked from a page in ``page_folder``), family, year, paper, points (the first
    is the default) and description."""
    def order(item: tuple[str, type[tokenpress.Method]]) -> tuple[int, int, str]:
        name, method_class = item
        return (list(APPROACH_HEADINGS).index(method_class.approach), method_class.year or 0, name)

    rows = ["| method | family | year | paper | points (first = default) | what it does |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, method_class in sorted(built_in_methods().items(), key=order):
        points = ", ".join(f"`{point}`" for point in method_class.points)
        link = posixpath.relpath(f"methods/{name}.md", page_folder or ".")
        rows.append(f"| [`{name}`]({link}) | {APPROACH_HEADINGS[method_class.approach]} | "
                    f"{method_class.year or ''} | {method_class.paper} | {points} | {method_class.description} |")
    return "\n".join(rows)


def methods_nav(nav: list[Any]) -> list[Any]:
    """``nav`` with its Methods section listing the index page and every built-in method's page."""
    pages = ["methods/index.md"] + [{name: f"methods/{name}.md"} for name in built_in_methods()]
    return [{SECTION: pages} if isinstance(item, dict) and SECTION in item else item for item in nav]


def on_config(config: Any) -> Any:
    config["nav"] = methods_nav(config["nav"])
    return config


def on_files(files: Files, config: Any) -> Files:
    for name, method_class in built_in_methods().items():
        uri = f"methods/{name}.md"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=page_source(method_class)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if TABLE_MARKER in markdown:
        return markdown.replace(TABLE_MARKER, methods_table(posixpath.dirname(page.file.src_uri)))
    return markdown

"""mkdocs hook: lists that would drift if written by hand, generated from the code at build time.

* ``<!-- commands-table -->``: every subcommand of ``tokenpress.tools.cli.build_parser()`` (nested ones such
  as ``zoo train`` included) with its arguments, its help and its options;
* ``<!-- plugins-output -->``: a console block with what ``tokenpress plugins`` prints;
* ``<!-- contract-checks -->``: every ``test_*`` check of the contract kit's ``MethodContract``, with
  its docstring and the reasons its ``pytest.skip`` calls give;
* ``<!-- contract-attributes -->``: the class attributes of ``MethodContract`` documented with ``#:``
  comments, with their types and defaults;
* ``<!-- moved-modules -->``: every old module path that still imports for one release, with where it
  lives now (``tokenpress._moved.MOVED``, what the deprecation aliases are made from).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tokenpress._moved import MOVED
from tokenpress.testing.contract import MethodContract
from tokenpress.tools import cli

COMMANDS_MARKER = "<!-- commands-table -->"
PLUGINS_MARKER = "<!-- plugins-output -->"
CHECKS_MARKER = "<!-- contract-checks -->"
ATTRIBUTES_MARKER = "<!-- contract-attributes -->"
MOVED_MARKER = "<!-- moved-modules -->"

CODE_SPAN = re.compile(r"(`[^`]*`)")
REST_LITERAL = re.compile(r"``(.+?)``")
REST_ROLE = re.compile(r":(?:py:)?[a-z]+:`~?(?:[\w.]+\.)?(?P<name>\w+)`")


def table_cell(text: str) -> str:
    """``text`` (reST or Markdown prose, any number of lines) as one Markdown table cell: double
    backticks and roles become code spans, lines are joined, and pipes outside code are escaped."""
    text = REST_ROLE.sub(r"`\g<name>`", REST_LITERAL.sub(r"`\1`", " ".join(text.split())))
    return "".join(part if part.startswith("`") else part.replace("|", "\\|") for part in CODE_SPAN.split(text))


@dataclass(frozen=True)
class Command:
    """One subcommand: its full name (``tokenpress zoo train``), its parser and its one-line help."""

    name: str
    parser: argparse.ArgumentParser
    help: str


def _subcommand_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]


def commands(parser: argparse.ArgumentParser | None = None) -> Iterator[Command]:
    """Every subcommand of ``parser`` (default: the ``tokenpress`` parser), depth first, in the
    parser's order; a command that only groups others (``zoo``) is not listed itself."""
    parser = parser or cli.build_parser()
    for action in _subcommand_actions(parser):
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, subparser in action.choices.items():
            if _subcommand_actions(subparser):
                yield from commands(subparser)
            else:
                yield Command(subparser.prog, subparser, helps.get(name, "").replace("%%", "%"))


def _positional(action: argparse.Action) -> str:
    name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{name}..." if action.nargs in ("+", "*", argparse.REMAINDER) else name


def _long_flag(action: argparse.Action) -> str:
    """``--n`` of ``-n/--n``: an option's first long form (its first form when it has none)."""
    return next((option for option in action.option_strings if option.startswith("--")), action.option_strings[0])


def _option(action: argparse.Action) -> str:
    if action.nargs == 0:
        return _long_flag(action)
    value = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{_long_flag(action)} {value}"


def synopsis(command: Command) -> str:
    """``tokenpress run STACK --model MODEL ...``: the command with its positionals and required options."""
    parts = [command.name]
    for action in command.parser._actions:
        if not action.option_strings and action.help is not argparse.SUPPRESS:
            parts.append(_positional(action))
        elif action.required:
            parts.append(_option(action))
    return " ".join(parts)


def optional_flags(command: Command) -> list[str]:
    """The command's optional options (``--json``, ``--n``), ``--help`` left out."""
    return [_long_flag(action) for action in command.parser._actions
            if action.option_strings and not action.required and not isinstance(action, argparse._HelpAction)]


def commands_table() -> str:
    """One row per subcommand: its synopsis, its help and its optional options."""
    rows = ["| command | what it does | options |", "| --- | --- | --- |"]
    for command in commands():
        options = ", ".join(f"`{flag}`" for flag in optional_flags(command)) or "-"
        rows.append(f"| `{synopsis(command)}` | {table_cell(command.help)} | {options} |")
    return "\n".join(rows)


def plugins_output() -> str:
    """What ``tokenpress plugins`` prints here, as a console block."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(["plugins"])
    if status != 0:
        raise RuntimeError(f"`tokenpress plugins` exited with {status}")
    return "```console\n$ tokenpress plugins\n" + printed.getvalue().rstrip("\n") + "\n```"


# --- the contract kit ---------------------------------------------------------------------------


def contract_checks(contract: type = MethodContract) -> dict[str, Callable[..., Any]]:
    """The checks pytest runs for a subclass of ``contract``: its ``test_*`` methods, bases first, each in
    the order of its class body."""
    checks: dict[str, Callable[..., Any]] = {}
    for klass in reversed(contract.__mro__):
        for name in vars(klass):
            if name.startswith("test_") and callable(getattr(contract, name)):
                checks.setdefault(name, getattr(contract, name))
    return checks


def _source_tree(function_or_class: Any) -> tuple[str, ast.Module]:
    source = textwrap.dedent(inspect.getsource(function_or_class))
    return source, ast.parse(source)


def _message(node: ast.expr) -> str:
    """The text of a skip message: f-string fields become ``METHOD``, ``FAMILY`` (or ``…``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        named = {"contract_method": "METHOD", "contract_family": "FAMILY"}
        return "".join(part.value if isinstance(part, ast.Constant) else
                       named.get(getattr(part.value, "id", ""), "…") for part in node.values)
    return "…"


def skip_reasons(check: Callable[..., Any]) -> list[str]:
    """The messages of the ``pytest.skip(...)`` calls in a check's own body."""
    _, tree = _source_tree(check)
    return [_message(node.args[0]) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "skip"
            and getattr(node.func.value, "id", None) == "pytest" and node.args]


def checks_table(contract: type = MethodContract) -> str:
    """One row per check: its name, its docstring and when it skips."""
    rows = ["| check | what it asserts |", "| --- | --- |"]
    for name, check in contract_checks(contract).items():
        text = inspect.getdoc(check) or ""
        reasons = skip_reasons(check)
        if reasons:
            text += " Skips with: " + "; ".join(f'"{reason}"' for reason in reasons) + "."
        rows.append(f"| `{name}` | {table_cell(text)} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Attribute:
    """A documented class attribute: its name, type and default as written in the source, and its ``#:``
    comment."""

    name: str
    type: str
    default: str
    meaning: str


def _comment_above(lines: list[str], lineno: int) -> str:
    """The ``#:`` comment lines right above line ``lineno`` (1-based), joined."""
    comment: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        comment.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(comment)


def documented_attributes(klass: type = MethodContract) -> list[Attribute]:
    """The class attributes of ``klass`` (and of its bases) that carry a ``#:`` comment, in source order
    (a subclass's value replaces its base's). Attributes on the lines right after a commented one share
    its comment (``#: Stages placed before and after ...`` above ``stages_before`` and ``stages_after``)."""
    found: dict[str, Attribute] = {}
    for base in reversed(klass.__mro__):
        if base is object:
            continue
        source, tree = _source_tree(base)
        lines = source.splitlines()
        shared, shared_until = "", 0  # the comment of the group being read, and its last line
        for node in tree.body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name, annotation = node.target.id, ast.get_source_segment(source, node.annotation) or ""
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name, annotation = node.targets[0].id, ""
            else:
                continue
            meaning = _comment_above(lines, node.lineno) or (shared if node.lineno == shared_until + 1 else "")
            shared, shared_until = meaning, node.end_lineno or node.lineno
            if not meaning or node.value is None:
                continue
            annotation = re.sub(r"^ClassVar\[(.*)\]$", r"\1", annotation)
            default = ast.get_source_segment(source, node.value) or ""
            found[name] = Attribute(name, annotation, default, meaning)
    return list(found.values())


def attributes_table(klass: type = MethodContract) -> str:
    """One row per documented class attribute: name, type, default and meaning."""
    rows = ["| attribute | type | default | meaning |", "| --- | --- | --- | --- |"]
    for attribute in documented_attributes(klass):
        rows.append(f"| `{attribute.name}` | `{attribute.type}` | `{attribute.default}` | "
                    f"{table_cell(attribute.meaning)} |")
    return "\n".join(rows)


# --- the old module paths ----------------------------------------------------------------------


def moved_table(moved: dict[str, str | tuple[str, ...]] = MOVED) -> str:
    """One row per old module path, in ``MOVED``'s order, with where it lives now: a module whose names were
    split among several lists them all, in the order its alias looks a name up."""
    rows = ["| old path (0.1, warns) | import from now |", "| --- | --- |"]
    for old, new in moved.items():
        targets = (new,) if isinstance(new, str) else new
        rows.append(f"| `{old}` | {', '.join(f'`{target}`' for target in targets)} |")
    return "\n".join(rows)


# --- the hook ------------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], str]] = {
    COMMANDS_MARKER: commands_table,
    PLUGINS_MARKER: plugins_output,
    CHECKS_MARKER: checks_table,
    ATTRIBUTES_MARKER: attributes_table,
    MOVED_MARKER: moved_table,
}


def render(markdown: str) -> str:
    """``markdown`` with every marker replaced by what it stands for."""
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown)

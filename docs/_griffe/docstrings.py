"""A griffe extension used by this site only (not part of the package): adapt tokenpress docstrings to mkdocstrings.

The code documents itself in prose with reST markup, and pydantic configs describe their fields in
``Field(description=...)``. Before rendering, for every object of a loaded package:

* a reST role (``:class:`~tokenpress.TokenState```) becomes a code span linking to the object's API
  entry when the site documents it (an *optional* cross-reference: no warning otherwise);
* a paragraph ending in ``::`` ends in ``:`` (the indented block after it is a Markdown code block);
* an attribute without a docstring takes, in this order: the ``description`` of a pydantic
  ``Field(..., description="...")`` value; the ``#:`` comment lines right above it; the comment at
  the end of its line (``embeddings: torch.Tensor  # (I, N, D)``), as the code documents dataclass
  fields that way.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|mod|attr|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")
LITERAL_INTRO = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj`` (best effort)."""
    if "." in target and target.split(".", 1)[0] in obj.modules_collection:
        return target
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            return scope.resolve(head) + (f".{rest}" if rest else "")
        except Exception:  # noqa: BLE001 - not in this scope: try the enclosing one
            scope = scope.parent
    for member in obj.module.members.values():  # :meth:`keep` in a module docstring: a method of a class there
        if not member.is_alias and member.is_class and head in member.members:
            return f"{member.path}.{target}"
    return target


def _convert(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        target = match["target"]
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        return f'<autoref identifier="{_resolve(obj, target)}" optional><code>{shown}</code></autoref>'

    return LITERAL_INTRO.sub(":", ROLE.sub(link, text))


def _field_description(attribute: griffe.Object) -> str | None:
    value = getattr(attribute, "value", None)
    if not isinstance(value, griffe.ExprCall) or not str(value.function).endswith("Field"):
        return None
    for argument in value.arguments:
        if isinstance(argument, griffe.ExprKeyword) and argument.name == "description":
            try:
                text = ast.literal_eval(str(argument.value))
            except (ValueError, SyntaxError):
                return None
            return text if isinstance(text, str) else None
    return None


TOOL_COMMENT = re.compile(r"^(noqa|type:|pragma|fmt:|ruff:)")


def _source_lines(obj: griffe.Object) -> list[str]:
    try:
        return obj.lines_collection[obj.filepath]
    except Exception:  # noqa: BLE001 - no source (compiled or inspected object)
        return []


def _comment_description(attribute: griffe.Object) -> str | None:
    lines = _source_lines(attribute)
    if not lines or not attribute.lineno:
        return None
    above = []
    index = attribute.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        above.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    if above:
        return " ".join(above)
    last = lines[(attribute.endlineno or attribute.lineno) - 1]
    try:
        comments = [token.string for token in tokenize.generate_tokens(io.StringIO(last.strip() + "\n").readline)
                    if token.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    text = comments[-1].lstrip("#").strip() if comments else ""
    return text if text and not TOOL_COMMENT.match(text) else None


class TokenpressDocstrings(griffe.Extension):
    """Rewrite the docstrings of a package once its object tree is complete."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is None and obj.is_attribute:
                description = _field_description(obj) or _comment_description(obj)
                if description:
                    obj.docstring = griffe.Docstring(description, parent=obj)
            if obj.docstring is not None:
                obj.docstring.value = _convert(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)

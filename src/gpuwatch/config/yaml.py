"""The bounded YAML loader: ``yaml.safe_load`` that refuses what would cost a reader time or memory.

On its own so that anything reading YAML from outside (the config, a webhook template) gets the
same limits; it knows nothing of what the document means. :func:`explain` turns PyYAML's words for
the usual indentation and tab mistakes into what is probably wrong, with line and column.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..text import quote

MAX_ALIAS_NODES = 100_000  # nodes that aliases may add to a document, all expansions counted
MAX_DEPTH = 64  # nesting; a config needs 5


class YamlLimitError(yaml.YAMLError):
    """A document past a limit of :class:`BoundedLoader`, with where it went past."""

    def __init__(self, mark: yaml.Mark | None, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past
    :data:`MAX_ALIAS_NODES` nodes ("billion laughs": 300 bytes that stand for a billion
    values, which any code that walks or prints the value pays for), an alias inside its own
    anchor (a recursive value), nesting deeper than :data:`MAX_DEPTH` (Python's recursion
    limit), and values Python cannot build (a date like 2024-13-45, a 5,000-digit number),
    each as a YAML error with its line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its size with every alias expanded
        self._expanded = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise YamlLimitError(
                    event.start_mark, f"the alias *{quote(event.anchor)[1:-1]} is inside its own anchor (a loop)"
                )
            self._expanded += size
            if self._expanded > MAX_ALIAS_NODES:
                raise YamlLimitError(
                    event.start_mark,
                    f"too many YAML aliases (they expand the document past {MAX_ALIAS_NODES} nodes)",
                )
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise YamlLimitError(mark, f"nested more than {MAX_DEPTH} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(child), 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
        self._sizes[id(node)] = size
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            text = str(exc)
            why = "a number with too many digits" if "integer string conversion" in text else quote(text)[1:-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({why})", node.start_mark
            ) from None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`BoundedLoader`'s limits."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _line(text: str, number: int) -> str:
    lines = text.splitlines()
    return lines[number - 1] if 0 < number <= len(lines) else ""


def explain(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error for people: `` line 3, column 5: invalid YAML: ...`` (to follow the file's name)
    saying what is probably wrong (a tab, a key indented wrongly, a value holding ``: ``), then the
    line as written; ``: invalid YAML: ...`` with PyYAML's words when it gives no place."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return f": invalid YAML: {problem}"
    line, column = mark.line + 1, mark.column + 1
    written = _line(text, line)
    context = getattr(exc, "context", None) or ""
    if "'\\t'" in problem or ("\t" in written[: mark.column + 1] and "cannot start any token" in problem):
        why = "a tab is not allowed for indentation in YAML; indent with spaces"
    elif problem == "mapping values are not allowed here":
        before = written[: mark.column]
        if ": " in before or before.rstrip().endswith(":"):
            why = "a value holds ': '; put the value in quotes (key: \"a: b\")"
        else:
            why = (
                f"the key on line {line} is indented wrongly (further in than the key above it), "
                "or the line above it lacks its ':'"
            )
    elif "expected <block end>" in problem and context == "while parsing a block mapping":
        if problem.endswith("'-'") or "block sequence" in problem:
            why = (
                f"the list item on line {line} is indented wrongly: a list goes under a key ending in ':', "
                "its '-' lines further in than that key, each in the same column"
            )
        else:
            why = (
                f"the key on line {line} is indented wrongly: it lines up with none of the keys above it "
                "(the keys of one section start in the same column)"
            )
    elif "could not find expected ':'" in problem:
        start = getattr(exc, "context_mark", None) or mark  # where the key without its ':' began
        line, column, written = start.line + 1, start.column + 1, _line(text, start.line + 1)
        why = f"line {line} has no ':' after its key (write key: value)"
    else:
        why = problem
    shown = written.rstrip()
    return f" line {line}, column {column}: invalid YAML: {why}" + (
        f" (the line reads: {quote(shown)})" if shown else ""
    )

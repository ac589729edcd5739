"""Read YAML into a tree of plain values that remembers the line of every key and value.

Only the YAML core types are accepted (mappings with string keys, sequences, strings,
integers, floats, booleans, null). Tags that build objects, merge keys (``<<``), duplicate
keys and multiple documents are errors, and alias expansion is capped so a small file
cannot blow up into a huge tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

_STR = "tag:yaml.org,2002:str"
_SCALAR_TAGS = frozenset(
    {
        _STR,
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
    }
)
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
MAX_NODES = 20_000
MAX_DEPTH = 64


@dataclass(slots=True)
class Node:
    """A value plus where it was written.

    ``value`` is ``dict[str, Node]``, ``list[Node]`` or a scalar. ``line`` is 1-based (None
    outside files), ``key_line`` the line of the mapping key that holds this node.
    ``text`` marks a value that is still raw text (environment variables, flags) and must
    be parsed for its field's type.
    """

    value: Any
    line: int | None = None
    key_line: int | None = None
    text: bool = False
    source: str | None = None  # per-node source (env var name, flag); None: the layer's

    def plain(self) -> Any:
        """The value with all nested nodes unwrapped."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


class YAMLProblem(Exception):
    """A YAML document that cannot be used; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader used only to compose nodes and resolve core scalar tags."""


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Builder:
    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.count = 0
        self.open: set[int] = set()  # the collections being built, by id

    def build(self, node: yaml.Node, key_line: int | None = None) -> Node:
        self.count += 1
        if self.count > MAX_NODES:
            raise YAMLProblem(f"document too large (more than {MAX_NODES} nodes)", _line(node))
        if isinstance(node, yaml.ScalarNode):
            return Node(self._scalar(node), _line(node), key_line)
        if id(node) in self.open:
            raise YAMLProblem(
                "an alias refers to a collection that holds it (a loop)", key_line or _line(node)
            )
        if len(self.open) >= MAX_DEPTH:
            raise YAMLProblem(f"nested deeper than {MAX_DEPTH} levels", _line(node))
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, key_line)
            if node.tag != _SEQ:
                raise YAMLProblem(f"unsupported YAML tag {node.tag}", _line(node))
            items = [self.build(item) for item in node.value]
            return Node(items, _line(node), key_line)
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, key_line: int | None) -> Node:
        if node.tag != _MAP:
            raise YAMLProblem(f"unsupported YAML tag {node.tag}", _line(node))
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            kline = _line(key_node)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YAMLProblem("YAML merge keys (<<) are not supported", kline)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                raise YAMLProblem("mapping keys must be plain strings", kline)
            key = str(key_node.value)
            if key in out:
                first = out[key].key_line
                raise YAMLProblem(f"duplicate key {key!r} (first set on line {first})", kline)
            out[key] = self.build(value_node, kline)
        return Node(out, _line(node), key_line)

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == _TIMESTAMP:
            # A date is kept as the text written: settings never hold datetime objects.
            return str(node.value)
        if node.tag not in _SCALAR_TAGS:
            raise YAMLProblem(f"unsupported YAML tag {node.tag}", _line(node))
        return self.loader.construct_object(node, deep=True)


def parse_yaml(text: str) -> Node:
    """Parse one YAML document whose top level is a mapping (an empty document is ``{}``)."""
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = int(mark.line) + 1 if mark is not None else None
            words = ", ".join(filter(None, (exc.context, exc.problem)))
            raise YAMLProblem(f"YAML syntax error: {words}", line) from None
        except yaml.YAMLError as exc:
            raise YAMLProblem(f"YAML error: {exc}", None) from None
        if root is None:
            return Node({}, 1)
        if not isinstance(root, yaml.MappingNode):
            raise YAMLProblem("the top level must be a mapping of sections", _line(root))
        return _Builder(loader).build(root)
    finally:
        loader.dispose()

"""HyperPyYAML files (CosyVoice's cosyvoice.yaml) read as plain data, without executing anything.

HyperPyYAML instantiates classes while it parses (`!new:pkg.Class`), calls functions (`!apply:fn`) and resolves
references (`!ref <key>`). Reading a checkpoint must not run code named in a file, so here:
* `!new:cls` / `!name:fn` nodes become dicts of their arguments plus `__class__` (the dotted name) and `__kind__`
  ("new" / "name"); a sequence argument list becomes `__args__`;
* `!apply:` nodes become None (they seed RNGs in CosyVoice's yamls), as do `!PLACEHOLDER` and unknown tags;
* `!ref <key>` / `!copy <key>` resolve against the document (`<a.b>` or `<a[b]>` for nested keys); an expression of
  numeric refs (`!ref <chunk_size> * <token_mel_ratio>`) is evaluated as arithmetic (no eval), anything else as
  string interpolation (`!ref <dir>/file`);
* numbers like `1e-06` are floats, as in YAML 1.2 (HyperPyYAML reads with ruamel).
"""
from __future__ import annotations

import ast
import operator
import re
from pathlib import Path
from typing import Any

import yaml

from omni2.engine.config import CheckpointError


class _Ref:
    def __init__(self, expr: str):
        self.expr = expr


class _HyperLoader(yaml.SafeLoader):
    pass


# HyperPyYAML reads YAML 1.2 (ruamel), where `1e-06` is a float; PyYAML's 1.1 resolver wants a dot.
_FLOAT_1_2 = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_HyperLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789"))


def _obj(kind: str):
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.MappingNode):
            args = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            args = {"__args__": loader.construct_sequence(node, deep=True)}
        else:
            value = loader.construct_scalar(node)
            args = {"__args__": [value]} if value != "" else {}
        return {"__class__": suffix, "__kind__": kind, **args}
    return construct


_HyperLoader.add_multi_constructor("!new:", _obj("new"))
_HyperLoader.add_multi_constructor("!name:", _obj("name"))
_HyperLoader.add_multi_constructor("!apply:", lambda loader, suffix, node: None)  # never executed
_HyperLoader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))
_HyperLoader.add_constructor("!copy", lambda loader, node: _Ref(loader.construct_scalar(node)))
_HyperLoader.add_constructor("!PLACEHOLDER", lambda loader, node: None)
_HyperLoader.add_constructor("!tuple", lambda loader, node: tuple(
    yaml.load("[" + loader.construct_scalar(node).strip().strip("()") + "]", Loader=_HyperLoader)))
_HyperLoader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !include etc.: not needed here

_REF = re.compile(r"<([^<>]+)>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("not arithmetic")


class _Resolver:
    def __init__(self, root: dict[str, Any], path: Path):
        self.root, self.path, self.stack = root, path, []

    def __call__(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: self(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(self(v) for v in node)
        if isinstance(node, _Ref):
            return self.ref(node.expr)
        return node

    def lookup(self, name: str) -> Any:
        parts = re.findall(r"[^.\[\]]+", name)
        if name in self.stack:
            raise CheckpointError(f"{self.path}: circular !ref <{name}>")
        node: Any = self.root
        for p in parts:
            if not isinstance(node, dict) or p not in node:
                raise CheckpointError(f"{self.path}: !ref <{name}> names no key")
            node = node[p]
        self.stack.append(name)
        try:
            return self(node)
        finally:
            self.stack.pop()

    def ref(self, expr: str) -> Any:
        names = _REF.findall(expr)
        if not names:
            raise CheckpointError(f"{self.path}: !ref {expr!r} holds no <key>")
        if _REF.fullmatch(expr.strip()):
            return self.lookup(names[0])
        values = {n: self.lookup(n) for n in names}
        text = _REF.sub(lambda m: repr(values[m.group(1)]), expr)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            try:
                return _arith(ast.parse(text.strip(), mode="eval"))
            except (SyntaxError, ValueError, ZeroDivisionError):
                pass
        return _REF.sub(lambda m: str(values[m.group(1)]), expr)  # string interpolation, e.g. <dir>/file


def load_hyperpyyaml_data(path: str | Path) -> dict[str, Any]:
    """The document of a HyperPyYAML file as plain dicts / lists / scalars, every reference resolved."""
    path = Path(path)
    try:
        doc = yaml.load(path.read_text(), Loader=_HyperLoader)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} does not hold a YAML mapping")
    return _Resolver(doc, path)(doc)



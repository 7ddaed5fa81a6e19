"""Check an ONNX graph against the operators the TensorRT ONNX parser supports (8.5, 8.6, 10.x).

The list and its source (onnx-tensorrt ``docs/operators.md`` of TensorRT 8.5 plus the changelog
up to 10.x) live in ``trt_ops.json`` beside this module. ``check_model`` returns one message per
offending node (name, op type, what is wrong); ``assert_trt_compatible`` raises with all of them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from haloae.errors import Failure

TABLE_PATH = Path(__file__).with_name("trt_ops.json")


class UnsupportedGraphError(Failure, ValueError):
    """The graph uses operators or attributes that TensorRT 8.5 / 8.6 / 10.x cannot parse."""


@functools.lru_cache(maxsize=1)
def load_op_table() -> dict[str, Any]:
    """The parsed ``trt_ops.json``."""
    return json.loads(TABLE_PATH.read_text())


def op_types(model) -> list[str]:
    """Sorted distinct op types of a model (subgraphs included)."""
    return sorted({node.op_type for node, _, _ in _walk(model.graph)})


def _walk(graph, path: str = ""):
    """Yield (node, where, graph) for every node, descending into If/Loop/Scan bodies."""
    import onnx

    for node in graph.node:
        yield node, path, graph
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g, f"{path}{node.name or node.op_type}/{attr.name}/")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, g in enumerate(attr.graphs):
                    yield from _walk(g, f"{path}{node.name or node.op_type}/{attr.name}[{i}]/")


def _constants(graph) -> set[str]:
    names = {init.name for init in graph.initializer}
    names |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return names


def _attr(node, name: str, default):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_problems(node, constants: set[str], table: dict[str, Any]) -> list[str]:
    op = node.op_type
    if node.domain not in table["domains"]:
        return [f"custom domain {node.domain!r} (TensorRT needs a plugin for it)"]
    if op not in table["supported"]:
        why = table["not_in_any_target"].get(op) or (
            f"added in TensorRT {table['added_after_8_5'][op]} only"
            if op in table["added_after_8_5"] else "not supported by the TensorRT ONNX parser")
        return [f"operator {op} is not allowed: {why}"]
    problems = []
    defaults = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                "nearest_mode": "round_prefer_floor", "antialias": 0,
                "keep_aspect_ratio_policy": "stretch"}
    rules = table["checked_attributes"].get(op, {})
    for key, allowed in rules.items():
        if key in ("note", "outputs") or (key == "nearest_mode" and _attr(node, "mode", "nearest")
                                          != "nearest"):
            continue
        value = _attr(node, key, defaults.get(key))
        if value not in allowed:
            problems.append(f"{op} attribute {key}={value!r} is unsupported (allowed: {allowed})")
    if "outputs" in rules and len([o for o in node.output if o]) > rules["outputs"]:
        problems.append(f"{op} with more than {rules['outputs']} output(s): {rules['note']}")
    for idx in table["constant_inputs"].get(op, []):
        if idx < len(node.input) and node.input[idx] and node.input[idx] not in constants:
            problems.append(f"{op} input {idx} ({node.input[idx]}) must be a constant initializer")
    return problems


def check_model(model) -> list[str]:
    """Problems that keep TensorRT 8.5 / 8.6 / 10.x from parsing ``model`` (empty when none)."""
    table = load_op_table()
    problems = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > table["max_opset"]:
            problems.append(f"graph opset {imp.version} > {table['max_opset']} (TensorRT 8.5 "
                            f"and 8.6 parse opset <= {table['max_opset']}): export with --opset 17")
    if model.functions:
        names = ", ".join(f.name for f in model.functions)
        problems.append(f"graph contains ONNX local functions ({names}): inline them")
    constants: dict[int, set[str]] = {}
    for node, where, graph in _walk(model.graph):
        consts = constants.setdefault(id(graph), _constants(graph) | _constants(model.graph))
        for reason in _node_problems(node, consts, table):
            problems.append(f"node {where}{node.name or '<unnamed>'} ({node.op_type}): {reason}")
    return problems


def assert_trt_compatible(model) -> None:
    """Raise ``UnsupportedGraphError`` naming every offending node."""
    problems = check_model(model)
    if problems:
        listing = "\n  ".join(problems)
        raise UnsupportedGraphError(
            f"the ONNX graph is not TensorRT-ready ({len(problems)} problem(s)); change the "
            f"model code so that it exports to supported operators:\n  {listing}")

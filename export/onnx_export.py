"""Trace ``HaloAEInference`` to a static-shape, TensorRT-ready ONNX graph (opset <= 17).

torch 2.13's exporter (``torch.onnx.export(..., dynamo=True)``) only writes opset 18 and its
automatic down-conversion fails on ``Pad`` ("No Adapter To Version 17"), so the graph is exported
at opset 18 and brought down to 17 here: opset 18 moved the ``axes`` of the Reduce* operators
from an attribute to an input, added ``axes`` to Pad, ``antialias`` / ``axes`` /
``keep_aspect_ratio_policy`` to Resize and ``num_outputs`` to Split. ``downgrade_to_opset17``
rewrites those nodes (only when the values are constants / defaults) and fails naming the node
otherwise. The IR version is set to 8 (ONNX 1.12, what the TensorRT 8.5 parser was built with).
``fold_zero_padding`` then folds the trunk's TF "same" padding (a Concat of a zero row / column
before each stride-2 conv) into the Conv's asymmetric pads: the same outputs, bit for bit, without
the copies.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from haloae.errors import Failure
from haloae.export import trt_ops

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = {"score": "score", "anomaly_map": "anomaly_map"}
IR_VERSION = 8
_REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


class ExportError(Failure, RuntimeError):
    """The model cannot be exported to a TensorRT-ready ONNX graph."""


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _pop_attr(node: onnx.NodeProto, name: str, default):
    value = _attr(node, name, default)
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    return value


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    return dims


def downgrade_to_opset17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite an opset-18 graph (as torch's exporter writes it) into opset 17, in place."""
    graph = model.graph
    consts = _constant_values(graph)
    dims: dict[str, list[int]] | None = None
    for node in graph.node:
        where = f"node {node.name} ({node.op_type})"
        if node.op_type in _REDUCE_OPS:
            if _pop_attr(node, "noop_with_empty_axes", 0):
                raise ExportError(f"{where}: noop_with_empty_axes=1 has no opset-17 equivalent")
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in consts:
                    raise ExportError(f"{where}: reduction axes are not constant")
                axes = [int(a) for a in consts[node.input[1]].reshape(-1)]
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", axes))
        elif node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            raise ExportError(f"{where}: Pad with an axes input has no opset-17 equivalent")
        elif node.op_type == "Resize":
            for key, default in (("antialias", 0), ("keep_aspect_ratio_policy", "stretch")):
                if _pop_attr(node, key, default) != default:
                    raise ExportError(f"{where}: {key} is not supported by TensorRT / opset 17; "
                                      "use interpolate(..., antialias=False)")
            if _pop_attr(node, "axes", None) is not None:
                raise ExportError(f"{where}: Resize axes has no opset-17 equivalent")
        elif node.op_type == "Split":
            n_out = _pop_attr(node, "num_outputs", None)
            if n_out is not None and not (len(node.input) > 1 and node.input[1]):
                dims = dims if dims is not None else _static_dims(model)
                axis = _pop_attr(node, "axis", 0)
                size = dims.get(node.input[0], [])[axis] if node.input[0] in dims else 0
                if not size or size % n_out:
                    raise ExportError(f"{where}: cannot turn num_outputs={n_out} into static "
                                      "split sizes")
                node.attribute.append(helper.make_attribute("axis", axis))
                name = f"{node.name}_split_sizes"
                graph.initializer.append(numpy_helper.from_array(
                    np.full(n_out, size // n_out, dtype=np.int64), name))
                node.input.append(name)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 17
    _drop_unused_initializers(graph)
    return model


def _zero_block(node: onnx.NodeProto | None, consts: dict[str, np.ndarray]) -> list[int] | None:
    """The shape of a ConstantOfShape node that fills zeros from a constant shape, else None."""
    if node is None or node.op_type != "ConstantOfShape" or node.input[0] not in consts:
        return None
    value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), None)
    if value is not None and np.any(value != 0):
        return None
    return [int(d) for d in consts[node.input[0]].reshape(-1)]


def fold_zero_padding(model: onnx.ModelProto) -> int:
    """Fold ``Concat(x, zeros)`` along a spatial axis into the Conv it feeds, in place: the
    Conv's end padding grows by the zero block's size, which is exactly the same convolution.

    TF "same" padding (`SameConv2d` in the EfficientNet trunk) appends one zero row / column
    before every stride-2 conv; as Concat nodes they copy the whole activation (1.9 ms of 51 ms
    kernel time in an ONNX Runtime profile of the edge model, the largest at 96 x 128 x 128).
    Asymmetric Conv pads are plain ONNX that ONNX Runtime and TensorRT take natively. Returns the
    number of Concat nodes removed."""
    graph = model.graph
    consts = _constant_values(graph)
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    folded = []
    # last node first: the column Concat folds before the row Concat that feeds it
    for node in reversed(graph.node):
        if node.op_type != "Concat" or len(node.input) != 2 or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "Conv" or u.input[0] != node.output[0]
                            or _attr(u, "auto_pad", "NOTSET") != "NOTSET" for u in users):
            continue
        axis = int(_attr(node, "axis", 0)) % 4
        block = _zero_block(producer.get(node.input[1]), consts)
        if block is None or len(block) != 4 or axis not in (2, 3):
            continue
        for u in users:
            pads = list(_pop_attr(u, "pads", [0, 0, 0, 0]))
            pads[axis] += block[axis]  # pads [h_begin, w_begin, h_end, w_end]: end of axis 2 / 3
            u.attribute.append(helper.make_attribute("pads", pads))
            u.input[0] = node.input[0]
        source = consumers[node.input[0]]
        consumers[node.input[0]] = [c for c in source if c is not node] + users
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _drop_dead_nodes(graph)
    return len(folded)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (repeatedly), then unused initializers."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in used for out in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _export_opset18(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    out = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=18, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES.values()), optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; report them all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export failed: {first}") from exc
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)
    log.debug("exporter output: %s", out.getvalue())
    return program.model_proto


def export_onnx(module: torch.nn.Module, input_shape: tuple[int, int, int, int], path: Path,
                opset: int = 17) -> onnx.ModelProto:
    """Export ``module`` (RGB [0, 1] NCHW -> (score, anomaly_map)) to ``path`` and check it.

    The graph has static shapes ``input_shape``, opset ``opset`` (<= 17), passes
    ``onnx.checker`` (full check) and the TensorRT operator check (``trt_ops``).
    """
    if not 13 <= opset <= 17:
        raise ExportError(f"--opset {opset}: use 13..17 (TensorRT 8.5/8.6 parse opset <= 17)")
    module = module.eval()
    example = torch.rand(*input_shape)
    model = downgrade_to_opset17(_export_opset18(module, example))
    folded = fold_zero_padding(model)
    log.debug("folded %d zero-padding Concat nodes into Conv pads", folded)
    if opset < 17:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:  # noqa: BLE001 - the C converter raises RuntimeError variants
            raise ExportError(f"cannot convert the graph to opset {opset} ({exc}); use 17") from exc
    model.ir_version = IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
    trt_ops.assert_trt_compatible(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    log.info("wrote %s (%d nodes, opset %d)", path, len(model.graph.node), opset)
    return model

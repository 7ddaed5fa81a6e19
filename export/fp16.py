"""fp32 -> fp16 ONNX graph with float32 inputs/outputs and fp32 islands where fp16 is unsafe.

The conversion itself is ONNX Runtime's ``onnxruntime.transformers.float16`` converter
(``keep_io_types=True``: Cast nodes at the graph boundary, weights stored as fp16, Cast nodes
inserted around every node kept in fp32). What this module decides is WHICH nodes stay fp32:

- by op type: Softmax, reductions (ReduceMean/Max/Sum...), TopK, Pow, Sqrt, Exp, Log, Erf,
  Reciprocal (overflow / accumulation / precision risks in fp16);
- the attention logits: every node feeding a Softmax back to (and including) the MatMul that
  produces the logits (the relative-position bias, a masking ``Where`` and the logit floor
  against the row maximum, ReduceMax / Sub / Clip, included), so the logits, their masking fill
  value and the softmax are fp32;
- the anomaly-map tail: every node between the graph outputs and the feature-error ``Sub``
  (F - F_hat) inclusive: squared error, channel mean, the position-wise Gaussian (its MatMul
  onto the least-variance directions cancels large values: fp16 would lose them), Gaussian
  smoothing, position normalisation, upsampling, max and the final threshold normalisation
  (Mul / Div) stay fp32; with ``map.coarse_weight`` also the cells' AveragePool and Gaussian.
"""

from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)

FP32_OP_TYPES = ("Softmax", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1",
                 "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "TopK", "Pow",
                 "Sqrt", "Exp", "Log", "Erf", "Reciprocal")
_LOGIT_PATH_OPS = {"Where", "Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Unsqueeze",
                   "Squeeze", "Expand", "Concat", "Slice", "Gather", "Cast", "Identity", "Flatten",
                   "Clip", "Max", "Min", "ReduceMax"}
_LOGIT_SOURCES = {"MatMul", "Gemm", "Einsum"}
_TAIL_OPS = {"Mul", "Div", "Add", "Sub", "Pow", "Sqrt", "ReduceMean", "ReduceMax", "ReduceSum",
             "ReduceMin", "TopK", "Resize", "Conv", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
             "Slice", "Gather", "Transpose", "Cast", "Identity", "Pad", "Clip", "Max", "Min",
             "Expand", "Abs", "MatMul", "Concat",  # Concat: the maps of map.fine_weight / coarse_weight
             "AveragePool"}  # map.coarse_weight: the cells' mean residual


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _dynamic_inputs(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                    graph_inputs: set[str]) -> list[str]:
    """Inputs computed by other non-Constant nodes or fed by the graph input."""
    return [i for i in node.input if i and (i in graph_inputs or (
        i in producers and producers[i].op_type != "Constant"))]


def _walk_back(starts: list[str], producers, graph_inputs, through: set[str],
               stop) -> set[str]:
    """Names of nodes reached from tensors ``starts`` backwards through op types ``through``;
    a node for which ``stop(node)`` is true is included but not walked past."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen or node.op_type == "Constant":
            continue
        if stop(node):
            seen.add(node.name)
            continue
        if node.op_type not in through:
            continue
        seen.add(node.name)
        stack.extend(_dynamic_inputs(node, producers, graph_inputs))
    return seen


def fp32_node_names(model: onnx.ModelProto) -> set[str]:
    """Nodes to keep in fp32: attention-logit paths and the anomaly-map tail (module doc)."""
    graph = model.graph
    producers = _producers(graph)
    graph_inputs = {v.name for v in graph.input}
    keep: set[str] = set()
    softmax_inputs = [n.input[0] for n in graph.node if n.op_type == "Softmax"]
    keep |= _walk_back(softmax_inputs, producers, graph_inputs, _LOGIT_PATH_OPS,
                       lambda n: n.op_type in _LOGIT_SOURCES)

    def is_error_sub(node: onnx.NodeProto) -> bool:
        return node.op_type == "Sub" and len(_dynamic_inputs(node, producers, graph_inputs)) == 2

    tail = _walk_back([o.name for o in graph.output], producers, graph_inputs, _TAIL_OPS,
                      is_error_sub)
    by_name = {n.name: n for n in graph.node}
    if not any(is_error_sub(by_name[name]) for name in tail):
        log.warning("no feature-error Sub behind the outputs: only the op types in "
                    "FP32_OP_TYPES stay fp32 in the map tail")
        tail = set()
    return keep | tail


def _name_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before use (ONNX and TensorRT require it)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pairs: the converter casts every kept
    node's output to fp16 and back before the next kept node, which would round the attention
    logits and the map tail to fp16 between two fp32 nodes. Consumers of the second Cast read
    the fp32 tensor itself; a first Cast left without consumers goes too. Returns the pairs."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.value_info, *graph.input, *graph.output]}
    elem.update({i.name: i.data_type for i in graph.initializer})
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        src = producers.get(node.input[0]) if node.input else None
        if (_cast_to(node) == onnx.TensorProto.FLOAT and src is not None
                and _cast_to(src) == onnx.TensorProto.FLOAT16
                and elem.get(src.input[0]) == onnx.TensorProto.FLOAT
                and node.output[0] not in outputs):
            rename[node.output[0]] = src.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in graph.node for i in n.input} | outputs
    dead = [n for n in graph.node if _cast_to(n) is not None and n.output[0] not in used]
    while dead:  # the second Casts, then first Casts that fed nothing else
        for n in dead:
            graph.node.remove(n)
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if _cast_to(n) is not None and n.output[0] not in used]
    names = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return len(rename)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 copy of ``model`` with float32 I/O and the fp32 islands described above."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
    _name_nodes(model)
    keep = fp32_node_names(model)
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OP_TYPES))
    log.info("fp16: %d of %d nodes kept in fp32", len(keep) + sum(
        n.op_type in op_block and n.name not in keep for n in model.graph.node),
        len(model.graph.node))
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=op_block,
                                    node_block_list=sorted(keep))
    fp16.ir_version = model.ir_version
    _topological_sort(fp16.graph)  # the converter appends its boundary Casts at the end
    # value_info of initializers kept fp32 still says fp16: initializers carry their own type
    inits = {i.name for i in fp16.graph.initializer}
    infos = [v for v in fp16.graph.value_info if v.name not in inits]
    del fp16.graph.value_info[:]
    fp16.graph.value_info.extend(infos)
    log.info("fp16: %d fp32 -> fp16 -> fp32 round trips between fp32 nodes removed",
             drop_fp16_round_trips(fp16))
    onnx.checker.check_model(fp16, full_check=True)
    return fp16

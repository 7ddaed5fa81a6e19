"""The TensorRT operator check: the recorded list and the graphs it rejects, naming the node."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from haloae.export import trt_ops


def _model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(graph, opset_imports=imports)


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _resize(**attrs):
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)
    return _model([node], [_f("x", [1, 1, 4, 4])], [_f("y", [1, 1, 8, 8])], [scales],
                  opset=18 if "antialias" in attrs else 17)


def test_table_records_its_source_and_the_three_targets():
    table = trt_ops.load_op_table()
    assert "onnx/onnx-tensorrt" in table["source"]["repository"]
    assert table["targets"] == ["8.5", "8.6", "10.x"] and table["max_opset"] == 17
    for op in ("Conv", "MatMul", "Softmax", "Resize", "ReduceMean", "Where", "Gather"):
        assert op in table["supported"]
    for op in ("Col2Im", "LayerNormalization", "IsInf", "Hardmax"):
        assert op not in table["supported"]


def test_supported_linear_resize_passes():
    model = _resize(mode="linear", coordinate_transformation_mode="half_pixel")
    assert trt_ops.check_model(model) == []


@pytest.mark.parametrize("attrs, expected", [
    (dict(mode="linear", antialias=1), "antialias=1"),
    (dict(mode="cubic"), "mode='cubic'"),
    (dict(mode="nearest", nearest_mode="round_to_even"), "nearest_mode"),
    (dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"),
     "coordinate_transformation_mode"),
])
def test_bad_resize_is_named(attrs, expected):
    problems = trt_ops.check_model(_resize(**attrs))
    assert any("node up (Resize)" in p and expected in p for p in problems), problems


def test_col2im_is_rejected_naming_the_node():
    shape = numpy_helper.from_array(np.array([4, 4], np.int64), "image_shape")
    block = numpy_helper.from_array(np.array([2, 2], np.int64), "block_shape")
    node = helper.make_node("Col2Im", ["x", "image_shape", "block_shape"], ["y"], name="fold_1")
    model = _model([node], [_f("x", [1, 4, 9])], [_f("y", [1, 1, 4, 4])], [shape, block], 18)
    with pytest.raises(trt_ops.UnsupportedGraphError) as err:
        trt_ops.assert_trt_compatible(model)
    msg = str(err.value)
    assert "node fold_1 (Col2Im)" in msg and "opset 18" in msg
    assert "graph opset 18 > 17" in msg


def test_later_and_custom_ops_are_rejected():
    scale = numpy_helper.from_array(np.ones(4, np.float32), "g")
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln"),
             helper.make_node("FancyOp", ["y"], ["z"], name="custom", domain="com.acme")]
    model = _model(nodes, [_f("x", [1, 4])], [_f("z", [1, 4])], [scale], domains=["com.acme"])
    problems = "\n".join(trt_ops.check_model(model))
    assert "node ln (LayerNormalization)" in problems and "8.6 only" in problems
    assert "node custom (FancyOp)" in problems and "custom domain 'com.acme'" in problems


def test_constant_input_rule_and_subgraphs():
    # Unsqueeze axes computed at run time (not an initializer) is rejected, also inside an If
    inner = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axes_dyn"], ["u"], name="unsq_in_if")], "then",
        [], [_f("u", None)])
    nodes = [helper.make_node("Shape", ["x"], ["axes_dyn"], name="shape"),
             helper.make_node("If", ["cond"], ["u"], name="branch", then_branch=inner,
                              else_branch=inner)]
    model = _model(nodes, [_f("x", [2]), helper.make_tensor_value_info("cond", TensorProto.BOOL,
                                                                       [])], [_f("u", None)])
    problems = trt_ops.check_model(model)
    assert any("branch/then_branch/unsq_in_if" in p and "must be a constant" in p
               for p in problems), problems

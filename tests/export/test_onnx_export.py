"""Export of the tiny model: graph contract, TensorRT op check, torch <-> ORT parity, fp16.

Uses an untrained tiny model calibrated on random images (parity does not need training); the
trained model's bundle is exercised by tests/train/test_eval.py.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from haloae import bundle as B
from haloae.export import parity, trt_ops
from haloae.export.cli import export_bundle
from haloae.export.fp16 import drop_fp16_round_trips, fp32_node_names
from haloae.export.onnx_export import downgrade_to_opset17
from haloae.train.checkpoint import load_checkpoint, save_checkpoint
from haloae.train.config import load_model_config
from haloae.train.inference import HaloAEInference
from haloae.train.torch_model import create_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fit_untrained):
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    model = create_model(cfg, pretrained=False).eval()
    calibration = fit_untrained(model)
    root = tmp_path_factory.mktemp("export")
    ckpt = save_checkpoint(root / "tiny.pt", model, calibration, {"epochs": 0, "seed": 0})
    out = root / "bundle"
    manifest = export_bundle(ckpt, out, fp16=True, batch=2, samples=3, threads=2).to_dict()
    return ckpt, out, manifest


def test_graph_contract(exported):
    _, out, manifest = exported
    model = onnx.load(str(out / B.MODEL_FP32))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version == 8
    io = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
          for v in [*model.graph.input, *model.graph.output]}
    assert io == {"image": [2, 3, 128, 128], "score": [2], "anomaly_map": [2, 1, 128, 128]}
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT
               for v in [*model.graph.input, *model.graph.output])
    assert trt_ops.check_model(model) == []
    ops = set(trt_ops.op_types(model))
    assert "Softmax" in ops and "ConvTranspose" in ops  # halo attention + decoder are in
    assert manifest["input"]["shape"] == [2, 3, 128, 128]
    B.verify_bundle(out, check_onnx=True)


def test_training_heads_are_not_exported(exported):
    ckpt, out, _ = exported
    model, _ = load_checkpoint(ckpt)
    graph = onnx.load(str(out / B.MODEL_FP32))
    weights = sum(int(np.prod(i.dims)) for i in graph.graph.initializer)
    heads = sum(p.numel() for p in [*model.image_decoder.parameters(),
                                    *model.classifier.parameters()])
    module = HaloAEInference(model)
    inference = sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers()
        if "gaussian" in n or "calibration" in n or "feat_" in n)
    assert weights < inference + heads  # no classifier / image decoder weights in the graph
    assert abs(weights - inference) < 0.1 * inference


def test_torch_vs_onnxruntime_parity_on_new_images(exported):
    ckpt, out, manifest = exported
    assert manifest["parity"]["fp32"]["max_abs_score"] <= 1e-4
    model, c = load_checkpoint(ckpt)
    module = HaloAEInference(model)
    x, _ = parity.sample_images(5, 128, seed=7)  # 5 = 2 full batches + 1 padded
    ref = parity.torch_runner(module, 2)(x)
    got = parity.run_bundle(B.Bundle.open(out), "fp32", x, threads=1)
    assert np.max(np.abs(ref[0] - got[0])) <= 1e-4
    assert np.max(np.abs(ref[1] - got[1])) <= 1e-3
    assert 0.05 < float(np.median(ref[0])) < 50  # normalised units, not raw squared errors


def test_fp16_graph_within_tolerance_and_fp32_islands(exported):
    _, out, manifest = exported
    rec = manifest["parity"]["fp16"]
    assert rec["finite"] and rec["max_abs_score"] <= 0.01 + 0.01 * 2  # scores ~0.5..2 here
    assert rec["verdicts_flipped"] == 0 and "map |d| <= 0.05" in rec["tolerance"]
    assert rec["map_pixels_flipped"] < 0.01
    assert manifest["files"][B.MODEL_FP16]["precision"] == "fp16"
    model16 = onnx.load(str(out / B.MODEL_FP16))
    io = [*model16.graph.input, *model16.graph.output]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)  # fp32 I/O
    conv_weights = {n.input[1] for n in model16.graph.node if n.op_type == "Conv"}
    types = {i.data_type for i in model16.graph.initializer if i.name in conv_weights}
    assert TensorProto.FLOAT16 in types  # the backbone really is fp16
    inferred = onnx.shape_inference.infer_shapes(model16)
    elem = {v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.value_info, *inferred.graph.input]}
    for node in inferred.graph.node:
        if node.op_type in ("Softmax", "ReduceMean", "ReduceMax", "ReduceSum", "TopK"):
            assert elem.get(node.input[0]) == TensorProto.FLOAT, node.name
    # the attention logits are fp32 from their MatMul through the bias and the floor to Softmax
    producer = {o: n for n in inferred.graph.node for o in n.output}
    for softmax in (n for n in inferred.graph.node if n.op_type == "Softmax"):
        node, path = producer[softmax.input[0]], []
        while node.op_type != "MatMul":
            path.append(node.op_type)
            assert elem.get(node.output[0]) == TensorProto.FLOAT, (softmax.name, node.name)
            node = producer[next(i for i in node.input if i in producer
                                 and producer[i].op_type not in ("Constant", "ReduceMax"))]
        assert elem.get(node.output[0]) == TensorProto.FLOAT, node.name  # the logits MatMul
        assert "Clip" in path, path
    assert trt_ops.check_model(model16) == []


def test_fp32_islands_cover_logits_and_map_tail():
    # x -> MatMul -> Add(bias) -> Where(mask) -> Softmax ; features - recon -> Pow -> ReduceMean
    nodes = [
        helper.make_node("MatMul", ["q", "k"], ["logits"], name="qk"),
        helper.make_node("Add", ["logits", "bias"], ["biased"], name="bias_add"),
        helper.make_node("Where", ["mask", "fill", "biased"], ["masked"], name="mask_fill"),
        helper.make_node("Softmax", ["masked"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "q"], ["recon"], name="av"),
        helper.make_node("Relu", ["q"], ["feats"], name="feat_relu"),
        helper.make_node("Sub", ["feats", "recon"], ["err"], name="error"),
        helper.make_node("Mul", ["err", "err"], ["sq"], name="square"),
        helper.make_node("Mul", ["sq", "half"], ["anomaly_map"], name="normalise"),
    ]
    f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "k"),
             numpy_helper.from_array(np.zeros((4, 4), np.float32), "bias"),
             numpy_helper.from_array(np.eye(4, dtype=bool), "mask"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "fill"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = helper.make_graph(nodes, "g", [f("q", [4, 4])], [f("anomaly_map", [4, 4])], inits)
    keep = fp32_node_names(helper.make_model(graph))
    assert {"qk", "bias_add", "mask_fill", "error", "square", "normalise"} <= keep
    assert "feat_relu" not in keep and "av" not in keep


def test_downgrade_moves_reduce_axes_to_attributes():
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 2, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 1, 2, 2])], [axes])
    model = downgrade_to_opset17(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)]))
    onnx.checker.check_model(model, full_check=True)
    assert list(model.graph.node[0].input) == ["x"] and not model.graph.initializer
    assert helper.get_attribute_value(model.graph.node[0].attribute[-1]) == [1]


def _padded_conv_graph(zero: float = 0.0, extra_user: bool = False) -> onnx.ModelProto:
    """x -> Concat(x, zeros row, axis 2) -> Concat(., zeros column, axis 3) -> Conv stride 2, as
    the exporter writes TF 'same' padding (`SameConv2d`); ``zero`` != 0 or ``extra_user`` (the
    padded tensor is also a graph output) must not fold."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 3, 1, 8], np.int64), "row_shape"),
             numpy_helper.from_array(np.array([1, 3, 9, 1], np.int64), "col_shape")]
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [zero])
    nodes = [helper.make_node("ConstantOfShape", ["row_shape"], ["row"], value=fill),
             helper.make_node("ConstantOfShape", ["col_shape"], ["col"], value=fill),
             helper.make_node("Concat", ["x", "row"], ["xr"], axis=2),
             helper.make_node("Concat", ["xr", "col"], ["xrc"], axis=3),
             helper.make_node("Conv", ["xrc", "w"], ["y"], strides=[2, 2], pads=[0, 0, 0, 0])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])]
    if extra_user:
        outputs.append(helper.make_tensor_value_info("xrc", TensorProto.FLOAT, [1, 3, 9, 9]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_zero_padding_concats_fold_into_exact_asymmetric_conv_pads():
    import onnxruntime as ort

    from haloae.export.onnx_export import fold_zero_padding

    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})[0]
    model = _padded_conv_graph()
    before = run(model)
    assert fold_zero_padding(model) == 2
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv"] and not model.graph.initializer[1:]
    pads = next(helper.get_attribute_value(a) for a in model.graph.node[0].attribute if a.name == "pads")
    assert list(pads) == [0, 0, 1, 1]  # height / width end padding: TF 'same' at stride 2
    np.testing.assert_array_equal(run(model), before)
    for untouched in (_padded_conv_graph(zero=1.0), _padded_conv_graph(extra_user=True)):
        n = len(untouched.graph.node)
        assert fold_zero_padding(untouched) == 0 and len(untouched.graph.node) == n


def test_edge_trunk_exports_without_padding_concats(tmp_path):
    """The EfficientNet trunk's stride-2 convs come out with asymmetric pads, no Concat before them."""
    from haloae.export.onnx_export import export_onnx
    from haloae.train.backbones import SameConv2d

    conv = torch.nn.Sequential(SameConv2d(3, 8, 3, 2, 32), torch.nn.ReLU6(), SameConv2d(8, 8, 5, 2, 16, groups=8))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            y = self.conv(x)
            return y.amax(dim=(1, 2, 3)), y.mean(dim=1, keepdim=True)

    model = export_onnx(Net().eval(), (1, 3, 32, 32), tmp_path / "m.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 2 and "Concat" not in ops and "ConstantOfShape" not in ops
    import onnxruntime as ort
    x = torch.rand(1, 3, 32, 32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = Net().eval()(x)
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-5)


def test_full_rank_gaussian_bundle_reads_prefix_blocks_with_parity(tmp_path, fit_untrained):
    """`edge` keeps every Gaussian direction (rank 0): its bundle carries the triangular factor
    as 4 prefix blocks (Slice + MatMul), passes the TensorRT operator check and the fp32 / fp16
    parity of the export, and the bundle run through ONNX Runtime matches torch."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    cfg.map.gaussian_rank = 0  # all 64 channels
    model = create_model(cfg, pretrained=False).eval()
    calibration = fit_untrained(model)
    assert model.gaussian.blocks == [16, 32, 48, 64]
    ckpt = save_checkpoint(tmp_path / "full.pt", model, calibration, {"epochs": 0, "seed": 0})
    manifest = export_bundle(ckpt, tmp_path / "bundle", fp16=True, batch=1, samples=2,
                             threads=2).to_dict()
    graph = onnx.load(str(tmp_path / "bundle" / B.MODEL_FP32))
    shapes = {tuple(t.dims[-2:]) for t in graph.graph.initializer if len(t.dims) == 3}
    assert {(16, 16), (32, 16), (48, 16), (64, 16)} <= shapes  # the blocks: prefix x columns
    assert (64, 64) not in shapes  # the full factor never ships
    blocks = {t.name for t in graph.graph.initializer if len(t.dims) == 3 and t.dims[-1] == 16}
    sliced = {n.output[0] for n in graph.graph.node if n.op_type == "Slice"}
    prefix_reads = [n for n in graph.graph.node if n.op_type == "MatMul" and set(n.input) & blocks]
    assert len(prefix_reads) == 4
    assert sum(bool(set(n.input) & sliced) for n in prefix_reads) == 3  # the last prefix is all
    assert manifest["parity"]["fp32"]["max_abs_score"] <= 1e-4
    loaded, _ = load_checkpoint(ckpt)
    x, _ = parity.sample_images(3, 128, seed=3)
    ref = parity.torch_runner(HaloAEInference(loaded), 1)(x)
    got = parity.run_bundle(B.Bundle.open(tmp_path / "bundle"), "fp32", x, threads=1)
    assert np.max(np.abs(ref[0] - got[0])) <= 1e-4 and np.max(np.abs(ref[1] - got[1])) <= 1e-3


def test_fp16_round_trips_between_fp32_nodes_are_dropped():
    """Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) between two fp32 nodes goes (the fp32 tensor is
    read directly, unrounded); a first Cast that also feeds an fp16 node stays."""
    import onnxruntime as ort

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["r16"], name="to16", to=f16),
        helper.make_node("Cast", ["r16"], ["r32"], name="to32", to=f32),
        helper.make_node("Softmax", ["r32"], ["s"], name="softmax", axis=-1),
        helper.make_node("Relu", ["r16"], ["h16"], name="half_relu"),  # an fp16 consumer
        helper.make_node("Cast", ["h16"], ["h"], name="h_to32", to=f32),
        helper.make_node("Add", ["s", "h"], ["y"], name="add"),
    ]
    vi = lambda n, t: helper.make_tensor_value_info(n, t, [2, 3])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("x", f32)],
                                                [vi("y", f32), vi("s", f32)]),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert drop_fp16_round_trips(model) == 1
    onnx.checker.check_model(model, full_check=True)
    names = [n.name for n in model.graph.node]
    assert "to32" not in names and "to16" in names and "h_to32" in names
    softmax = next(n for n in model.graph.node if n.name == "softmax")
    assert list(softmax.input) == ["r"]  # TensorRT would have honoured the rounding
    x = np.array([[1.0001, 2.0, 3.0], [0.1001, 0.2001, 0.3001]], np.float32)  # not fp16 values
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["s"], {"x": x})[0]
    np.testing.assert_allclose(got, np.exp(x) / np.exp(x).sum(-1, keepdims=True), rtol=1e-6)

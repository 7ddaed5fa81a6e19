"""Bundle format: manifest, verification of hashes / version / shapes, tampering, --verify CLI."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from haloae import bundle as B
from haloae.manifest import Manifest, read_manifest


def _toy_graph(path, n=1, size=8):
    """image [n,3,s,s] -> anomaly_map = channel mean [n,1,s,s], score = max of the map [n]."""
    nodes = [helper.make_node("ReduceMean", ["image"], ["anomaly_map"], axes=[1], keepdims=1,
                              name="map_mean"),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3],
                              keepdims=0, name="score_max")]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [n, 3, size, size])
    graph = helper.make_graph(
        nodes, "toy", [image],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [n]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [n, 1, size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_bundle(folder, n=1, size=8):
    folder.mkdir(parents=True)
    _toy_graph(folder / B.MODEL_FP32, n, size)
    manifest = Manifest.create(
        input_name="image", input_shape=[n, 3, size, size], mean=[0.5] * 3, std=[0.5] * 3,
        output_names={"score": "score", "anomaly_map": "anomaly_map"},
        threshold={"raw_image": 0.02, "raw_pixel": 0.01, "method": "quantile"},
        files={B.MODEL_FP32: B.file_entry(folder / B.MODEL_FP32, "fp32")},
        model={"id": "toy-1", "name": "toy"}, parity={"samples": 0})
    manifest.write(folder)
    return folder


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


def _edit_manifest(folder, change):
    path = folder / B.MANIFEST
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_manifest_fields_and_verify_ok(bundle):
    manifest = B.verify_bundle(bundle, check_onnx=True)
    m = manifest.to_dict()
    assert m == json.loads((bundle / B.MANIFEST).read_text()), "what is read is what is on disk"
    assert m["format"] == "haloae-bundle" and m["version"] == 1
    assert m["input"]["color"] == "RGB" and m["input"]["normalization"] == "in-graph"
    assert m["input"]["scale"] == pytest.approx(1 / 255)
    assert m["outputs"]["anomaly_map"]["shape"] == [1, 1, 8, 8]
    assert m["threshold"]["image"] == 0.5 and m["threshold"]["pixel"] == 0.5
    assert "0.5 * score_raw / raw_image" in m["threshold"]["formula"]
    assert B.model_file(bundle, manifest, "fp16").name == B.MODEL_FP32  # no fp16 file: falls back


def test_bundle_hash_ignores_threshold_edits_but_not_model_bytes(bundle):
    h = B.bundle_hash(read_manifest(bundle))
    _edit_manifest(bundle, lambda m: m["threshold"].update(image=0.6))
    assert B.bundle_hash(read_manifest(bundle)) == h
    _edit_manifest(bundle, lambda m: m["files"][B.MODEL_FP32].update(sha256="0" * 64))
    assert B.bundle_hash(read_manifest(bundle)) != h


def _flip_byte(folder):
    path = folder / B.MODEL_FP32
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, expected", [
    (_flip_byte, "does not match its sha256"),
    (lambda f: (f / B.MODEL_FP32).unlink(), "listed in the manifest but missing"),
    (lambda f: (f / B.MANIFEST).unlink(), "manifest.json is missing"),
    (lambda f: _edit_manifest(f, lambda m: m.update(version=99)), "manifest version 99"),
    (lambda f: _edit_manifest(f, lambda m: m.update(format="other")), "not a HaloAE bundle"),
    (lambda f: _edit_manifest(f, lambda m: m.pop("files")), "lacks the section(s) files"),
    (lambda f: (f / B.MANIFEST).write_text("{not json"), "not valid JSON"),
    (lambda f: _edit_manifest(f, lambda m: m["outputs"]["anomaly_map"].update(shape=[1, 1, 4, 4])),
     "implies [1, 1, 8, 8]"),
])
def test_tampered_bundle_is_rejected_with_a_clear_message(bundle, tamper, expected):
    tamper(bundle)
    with pytest.raises(B.BundleError) as err:
        B.verify_bundle(bundle)
    assert expected in str(err.value)
    assert "haloae-export" in str(err.value) or "copy" in str(err.value)


def test_manifest_shape_disagreeing_with_onnx_graph(tmp_path):
    # manifest and its outputs say 16x16 but the graph is 8x8: only the ONNX check sees it
    folder = make_bundle(tmp_path / "b")
    def to16(m):
        m["input"]["shape"] = [1, 3, 16, 16]
        m["outputs"]["anomaly_map"]["shape"] = [1, 1, 16, 16]
    _edit_manifest(folder, to16)
    B.verify_bundle(folder)  # hashes and manifest are self-consistent
    with pytest.raises(B.BundleError, match=r"graph input 'image' has shape \[1, 3, 8, 8\]"):
        B.verify_bundle(folder, check_onnx=True)
    renamed = make_bundle(tmp_path / "renamed")
    _edit_manifest(renamed, lambda m: m["outputs"]["score"].update(name="prob"))
    with pytest.raises(B.BundleError, match="no graph output named 'prob'"):
        B.verify_bundle(renamed, check_onnx=True)


def test_missing_folder(tmp_path):
    with pytest.raises(B.BundleError, match="does not exist"):
        B.verify_bundle(tmp_path / "nope")


def test_bundle_modules_import_no_inference_library():
    """Reading and verifying a bundle, and the engine cache, load no torch / ONNX / TensorRT
    (core: stdlib + numpy; the inference libraries load when a backend is built)."""
    code = ("import sys, haloae.bundle, haloae.manifest, haloae.runtime.trt_engine; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "haloae.export.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_verify_cli_ok_and_tampered(bundle, tmp_path):
    ok = _cli("--verify", bundle)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    _flip_byte(bad)
    proc = _cli("--verify", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256" in lines[0], proc.stderr


def test_engine_without_tensorrt_warns_and_exits_0(bundle, tmp_path):
    proc = _cli("--engine", bundle, "--engine-cache", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "TensorRT is not installed" in proc.stderr and "haloae-edge" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_toy_bundle_runs_in_onnxruntime(bundle):
    from haloae.runtime import load_backend

    backend = load_backend(bundle, "onnxruntime", threads=1)
    x = np.random.default_rng(0).random(backend.input_shape, dtype=np.float32)
    score, amap = backend.run(x)
    assert amap.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(score, x.mean(axis=1).max(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("case", ["missing-checkpoint", "out-not-a-bundle"])
def test_export_cli_bad_input_exit_2(tmp_path, capsys, case):
    from haloae.export.cli import main

    out = tmp_path / "out"
    if case == "out-not-a-bundle":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (tmp_path / "c.pt").write_bytes(b"x")
        args, expected = [str(tmp_path / "c.pt"), "--out", str(out)], "is not a bundle"
    else:
        args, expected = [str(tmp_path / "nope.pt"), "--out", str(out)], "not found"
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and expected in err[0], err
    assert case != "out-not-a-bundle" or (out / "notes.txt").read_text() == "mine"

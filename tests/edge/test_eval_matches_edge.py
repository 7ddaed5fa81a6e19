"""``haloae-eval --bundle B`` and the edge daemon's inference path give the same score for the same
image: both run the bundle through ``haloae.runtime.load_backend`` after ``haloae.preprocess``.

The bundle is a real ONNX graph (built with ``onnx.helper``, run by ONNX Runtime) whose score
depends on the colour order (channel weights 0.6 / 0.3 / 0.1), the resize (a max over pixels of a
frame of another size than the 12 x 12 input) and the scale, so a second, different preprocessing
anywhere would show as a score difference.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import zmq
from onnx import TensorProto, helper

from haloae import bundle as B
from haloae.edge.config import CameraConfig, EdgeConfig
from haloae.edge.infer import InferenceWorker
from haloae.edge.ipc import FrameSender, LatestFrames
from haloae.edge.reload import load_model
from haloae.edge.stats import Stats
from haloae.manifest import Manifest
from haloae.train.eval_cli import main as eval_main

SIZE = 12
WEIGHTS = [0.6, 0.3, 0.1]  # R, G, B


def _colour_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True)
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], WEIGHTS)
    nodes = [helper.make_node("Mul", ["image", "w"], ["weighted"]),
             helper.make_node("ReduceMean", ["weighted"], ["anomaly_map"], axes=[1], keepdims=1),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes, "colour", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, SIZE, SIZE])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / B.MODEL_FP32))
    Manifest.create(input_name="image", input_shape=[1, 3, SIZE, SIZE], mean=[], std=[],
                    output_names={"score": "score", "anomaly_map": "anomaly_map"},
                    threshold={"raw_image": 1.0, "raw_pixel": 1.0, "method": "quantile"},
                    files={B.MODEL_FP32: B.file_entry(folder / B.MODEL_FP32, "fp32")},
                    model={"id": "colour-1", "name": "colour"}, parity={}).write(folder)
    return folder


def _images(root: Path) -> list[Path]:
    """Good and bad PNGs (BGR on disk, as a camera or a plant's folder has them), 37 x 29 pixels."""
    rng = np.random.default_rng(3)
    paths = []
    for kind in ("good", "bad"):
        (root / kind).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (29, 37, 3), dtype=np.uint8)
            img[..., 2] //= (1 + i)  # the red channel differs most between images
            path = root / kind / f"{i}.png"
            cv2.imwrite(str(path), img)
            paths.append(path)
    return paths


def _eval_scores(bundle: Path, data: Path, out: Path) -> dict[str, float]:
    assert eval_main(["--bundle", str(bundle), "--data", str(data), "--out", str(out), "--threads", "1",
                      "--no-progress", "--overlays", "0"]) == 0
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {str(Path(r["path"]).resolve()): float(r["score"]) for r in rows}


def _edge_scores(bundle: Path, paths: list[Path], tmp_path: Path) -> dict[str, float]:
    """The daemon's model loading and inference worker on the frames a camera would deliver (RGB)."""
    cfg = EdgeConfig.model_validate({"node": "n", "state_dir": str(tmp_path / "state"),
                                     "cameras": [{"id": "cam", "source": "synthetic"}],
                                     "model": {"bundle": str(bundle), "threads": 1}})
    model = load_model(cfg)
    ctx = zmq.Context()
    frames = LatestFrames({"cam": True}, ctx, "inproc://eval-edge").start()
    results = []
    worker = InferenceWorker(model.backend, model.manifest, model.model_id, frames, results.append,
                             Stats(["cam"]), [CameraConfig(id="cam", source="synthetic")])
    worker.start()

    def send():
        sender = FrameSender(ctx, "inproc://eval-edge", "cam", lossless=True)
        for i, p in enumerate(paths):
            sender.send(i, time.time(), cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB))
        sender.close()

    t = threading.Thread(target=send)
    t.start()
    deadline = time.monotonic() + 30
    while len(results) < len(paths) and time.monotonic() < deadline and not worker.fatal:
        time.sleep(0.02)
    t.join(5)
    worker.stop(), worker.join(5), frames.stop(), ctx.term()
    assert worker.fatal is None and len(results) == len(paths)
    return {str(paths[r.frame_id].resolve()): r.score for r in results}


def test_haloae_eval_and_the_edge_score_an_image_the_same(tmp_path):
    bundle = _colour_bundle(tmp_path / "bundle")
    paths = _images(tmp_path / "data")
    evaluated = _eval_scores(bundle, tmp_path / "data", tmp_path / "report")
    edge = _edge_scores(bundle, paths, tmp_path)
    assert sorted(evaluated) == sorted(edge)
    for path, score in edge.items():
        assert evaluated[path] == float(f"{score:.8g}"), (path, evaluated[path], score)  # as scores.csv writes it
    values = sorted(edge.values())
    assert values[-1] - values[0] > 0.05, "the scores tell the images apart"
    # the colour order matters to this graph: a BGR frame would have scored differently
    bgr = cv2.imread(str(paths[-1]))
    from haloae.preprocess import to_batch
    from haloae.runtime import load_backend
    backend = load_backend(bundle, "onnxruntime", threads=1)
    wrong = float(backend.run(to_batch([bgr], backend.input_shape))[0][0])
    assert abs(wrong - edge[str(paths[-1].resolve())]) > 1e-3

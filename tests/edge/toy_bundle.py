"""Tiny real bundles for daemon tests: an ONNX graph built with ``onnx.helper`` (8x8 input), a
manifest from ``haloae.manifest``, run by ONNX Runtime like any bundle; and videos of
frames of known brightness written with OpenCV.

The graph's anomaly map is the channel mean of the input (``sqrt(mean - offset)`` with
``offset``) and the score is the map's maximum, so a uniform frame of brightness ``b`` scores
``b / 255`` (or ``sqrt(b / 255 - offset)``, NaN when ``b / 255 < offset``): bright frames are
``defect`` at the 0.5 threshold, dark ones ``ok`` (or NaN).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from haloae import bundle as B
from haloae.manifest import Manifest

SIZE = 8
DARK, MID, BRIGHT = 40, 110, 235  # 0.16, 0.43, 0.92 of full scale


def _graph(path: Path, offset: float | None) -> None:
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1)]
    inits = []
    if offset is None:
        nodes.append(helper.make_node("Identity", ["mean"], ["anomaly_map"]))
    else:
        inits.append(helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]))
        nodes += [helper.make_node("Sub", ["mean", "offset"], ["shifted"]),
                  helper.make_node("Sqrt", ["shifted"], ["anomaly_map"])]
    nodes.append(helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, SIZE, SIZE])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_toy_bundle(folder: Path, offset: float | None = None, model_id: str = "toy-1") -> Path:
    """A verified bundle in ``folder`` (see the module doc for what it computes)."""
    folder.mkdir(parents=True, exist_ok=True)
    _graph(folder / B.MODEL_FP32, offset)
    manifest = Manifest.create(
        input_name="image", input_shape=[1, 3, SIZE, SIZE], mean=[0.5] * 3, std=[0.5] * 3,
        output_names={"score": "score", "anomaly_map": "anomaly_map"},
        threshold={"raw_image": 0.02, "raw_pixel": 0.01, "method": "quantile"},
        files={B.MODEL_FP32: B.file_entry(folder / B.MODEL_FP32, "fp32")},
        model={"id": model_id, "name": "toy"}, parity={"samples": 0})
    manifest.write(folder)
    B.verify_bundle(folder, check_onnx=True)
    return folder


def write_video(path: Path, levels: list[int], size: int = 32) -> Path:
    """An MJPG video whose frame i is uniformly grey at ``levels[i]``."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    for level in levels:
        vw.write(np.full((size, size, 3), level, np.uint8))
    vw.release()
    return path

"""Plain data handed between the daemon's stages: inference results and camera status.

``FrameResult`` goes from the inference worker (``edge/infer.py``) to the publisher
(``edge/publish.py``); ``CameraStatus`` from the capture workers (``edge/capture.py``) via the
app to the publisher. numpy only, so every edge module can import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

CameraState = Literal["online", "offline", "starting", "ended"]


@dataclass
class FrameResult:
    """One inspected frame."""

    camera: str
    frame_id: int
    timestamp: float  # capture wall-clock time (time.time())
    score: float  # normalised, threshold 0.5 by default
    threshold: float  # image threshold in force for this camera
    pixel_threshold: float  # normalised pixel threshold (0.5 by default)
    anomalous: bool  # score >= threshold
    anomaly_map: np.ndarray  # float32 HxW normalised, at the model's input resolution
    frame: np.ndarray  # RGB uint8 as fed to the model (after ROI crop, before resize)
    latency_ms: dict = field(default_factory=dict)  # {"capture", "queue", "inference", "total"}
    model_id: str = ""
    zones: object | None = None  # the camera's ZoneSet (haloae/zones.py) applied to score and map, else None


@dataclass
class CameraStatus:
    """Health of one camera, published on ``<prefix>/<camera>/status``.

    ``state``: ``starting`` (opening), ``online`` (frames flowing), ``offline`` (lost, being
    reopened with backoff; ``detail`` says why and when the next try is), ``ended`` (a finite
    file or folder reached its end and does not loop).
    """

    camera: str
    state: CameraState
    detail: str = ""
    frames: int = 0  # frames delivered to inference since start
    dropped: int = 0  # frames replaced by a newer one before inference took them
    errors: int = 0  # garbage / wrong-size / unreadable frames skipped
    invalid: int = 0  # frames the model gave NaN / inf outputs for (not published)
    since: float = field(default_factory=time.time)  # wall-clock time of the last state change
    backend: str = ""  # inference backend scoring this camera's frames ("onnxruntime (CPU)", ...)
    model_id: str = ""  # bundle model id, as in FrameResult.model_id

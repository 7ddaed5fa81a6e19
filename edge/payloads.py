"""The JSON documents of the daemon's MQTT topics (docs/mqtt.md); schema version ``v`` = 1."""

from __future__ import annotations

import json
import time
from typing import Any

from .alarms import SCHEMA_VERSION, iso_utc, num


def dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def state_text(value: Any) -> str:
    return str(value)


def result_payload(node: str, r, regions_: list[dict], alarm_id: str | None) -> dict:
    """The JSON document of ``<prefix>/<camera>/result``."""
    h, w = r.frame.shape[:2]
    lat = {k: num(v, 2) for k, v in (r.latency_ms or {}).items()}
    return {"v": SCHEMA_VERSION, "node": node, "camera": r.camera, "frame_id": int(r.frame_id),
            "timestamp": iso_utc(r.timestamp), "epoch": round(float(r.timestamp), 3),
            "score": num(r.score), "verdict": "defect" if r.anomalous else "ok",
            "threshold": float(r.threshold), "pixel_threshold": float(r.pixel_threshold),
            "latency_ms": lat, "model": r.model_id, "width": w, "height": h,
            "regions": regions_, "alarm": alarm_id}


def status_doc(s, alarms_dead: int, outbox_problem: str | None, daemon: str = "running") -> bytes:
    """The retained ``<prefix>/<camera>/status``; ``daemon`` is ``running`` or ``stopped`` (clean stop)."""
    doc = {"v": SCHEMA_VERSION, "camera": s.camera, "state": s.state, "detail": s.detail,
           "frames": s.frames, "dropped": s.dropped, "errors": s.errors, "invalid": getattr(s, "invalid", 0),
           "since": iso_utc(s.since), "since_epoch": round(s.since, 3),
           "backend": getattr(s, "backend", ""), "model": getattr(s, "model_id", ""),
           "alarms_dead": alarms_dead, "outbox_problem": outbox_problem, "daemon": daemon,
           "timestamp": iso_utc(time.time())}
    return dumps(doc)


def drift_payload(camera: str, d: dict) -> bytes:
    """The retained ``<prefix>/<camera>/drift`` (``d`` from edge/drift.py)."""
    return dumps({"v": SCHEMA_VERSION, "camera": camera, **d, "timestamp": iso_utc(time.time())})

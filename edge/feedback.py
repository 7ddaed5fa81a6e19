"""``<prefix>/<camera>/feedback/set``: the line tells the daemon whether an alarm was right.

A label (``ok`` = a false positive, ``defect`` = confirmed) for an alarm event id or a frame id
files the matching evidence (``edge/evidence.py``: frame, mask, overlay, result JSON) into a
labelled folder under the state directory, outside the evidence quota::

    <state_dir>/feedback/good/<camera>_<date>T<time>_<frame_id>.jpg      frames labelled ok
    <state_dir>/feedback/defect/<camera>_<date>T<time>_<frame_id>.jpg    frames labelled defect
    <state_dir>/feedback/evidence/<good|defect>/<same name>_mask.png, _overlay.jpg,
                                                <same name>.json         (result + the label)

``feedback/`` is then a plant folder that ``haloae-eval --data`` reads as it is (good/ + defect/;
``evidence/`` is not a class), and ``feedback/good`` is training data (``haloae-retrain``). The
frames are what the model saw before resizing: after the camera's ROI crop. A frame filed again
with the other label moves. An alarm's frames are those of its evidence (at most one per
``evidence.min_interval_s``); frames judged ``ok`` are not kept on disk, so a missed defect can
be filed only while its frame is still in the evidence.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from haloae.errors import UserError

from . import topics
from .alarms import SCHEMA_VERSION, iso_utc
from .commands import LABELS, Feedback
from .payloads import dumps

if TYPE_CHECKING:
    from .app import EdgeApp

log = logging.getLogger(__name__)

MAX_SCANNED = 5000  # result JSON files read to find one alarm's frames
MAX_FRAMES = 200  # frames filed for one alarm


class FeedbackError(UserError, ValueError):
    """Nothing to file (no such alarm or frame in the evidence); the text says why."""


def _alarm_start(event: str) -> float | None:
    """Start epoch of ``<node>-<camera>-<start epoch ms>-<random>``."""
    parts = event.rsplit("-", 2)
    try:
        return int(parts[1]) / 1000.0 if len(parts) == 3 else None
    except ValueError:
        return None


def find_evidence(camera_dir: Path, fb: Feedback) -> list[Path]:
    """The result JSON files of ``camera_dir`` (``evidence/<camera>``) that ``fb`` names, oldest
    first: every frame of the alarm ``fb.event``, or the newest frame ``fb.frame_id``."""
    if not camera_dir.is_dir():
        return []
    days = sorted((d for d in camera_dir.iterdir() if d.is_dir()), reverse=True)
    if fb.frame_id is not None:
        for day in days:  # newest first: frame ids start again at 0 after a restart
            hits = sorted(day.glob(f"*_{int(fb.frame_id)}.json"), reverse=True)
            if hits:
                return hits[:1]
        return []
    start = _alarm_start(fb.event or "")
    first_day = (datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y-%m-%d") if start else "")
    found, scanned = [], 0
    for day in sorted(d for d in days if d.name >= first_day):
        for path in sorted(day.glob("*.json")):
            scanned += 1
            if scanned > MAX_SCANNED:
                return found
            try:
                if json.loads(path.read_bytes()).get("alarm") == fb.event:
                    found.append(path)
            except (OSError, ValueError, AttributeError):
                continue
            if len(found) >= MAX_FRAMES:
                return found
    return found


class FeedbackDesk:
    """Queues ``feedback/set`` requests (publisher thread) and files them (main thread)."""

    def __init__(self, app: "EdgeApp"):
        self.app = app
        cfg = app.cfg
        self.evidence_root = cfg.state_dir / cfg.evidence.dir if cfg.evidence.enabled else None
        self.root = cfg.state_dir / "feedback"
        self._requests: list[tuple[str, Feedback]] = []

    def request(self, camera: str, fb: Feedback) -> None:
        self._requests.append((camera, fb))
        self.app.wake()

    def poll(self) -> None:
        while self._requests:
            camera, fb = self._requests.pop(0)
            try:
                self.file(camera, fb)
            except FeedbackError as err:
                self._report(camera, fb, "not_found", error=str(err))
                self.app.publisher.publish_error("feedback", str(err), camera=camera, event_id=fb.event,
                                                 frame_id=fb.frame_id)
            except OSError as err:
                text = f"cannot file feedback in {self.root}: {err.strerror or err}; free disk space"
                log.error("%s", text)
                self._report(camera, fb, "failed", error=text)
                self.app.publisher.publish_error("feedback", text, camera=camera)

    def file(self, camera: str, fb: Feedback) -> list[Path]:
        what = f"alarm {fb.event}" if fb.event else f"frame {fb.frame_id}"
        if self.evidence_root is None:
            raise FeedbackError(f"{camera}: cannot file {what}: evidence.enabled is false, so no frames are kept; "
                                "enable evidence in the YAML")
        hits = find_evidence(self.evidence_root / camera, fb)
        if not hits:
            raise FeedbackError(f"{camera}: {what} is not in the evidence ({self.evidence_root / camera}): only "
                                "anomalous frames are kept, at most one per evidence.min_interval_s, and the quota "
                                "deletes the oldest; check the id on the result / alarm messages")
        folder = LABELS[fb.label]
        other = next(f for f in LABELS.values() if f != folder)
        filed = [self._file_one(camera, j, fb, folder, other) for j in hits]
        log.info("feedback: %s of %s labelled %s: %d frame(s) filed in %s", what, camera, fb.label, len(filed),
                 self.root / folder)
        self._report(camera, fb, "filed", frames=len(filed), folder=str(self.root / folder),
                     files=[p.name for p in filed[:20]])
        return filed

    def _file_one(self, camera: str, result_json: Path, fb: Feedback, folder: str, other: str) -> Path:
        stem = result_json.name[:-len(".json")]  # HHMMSS.mmm_<frame_id>
        name = f"{camera}_{result_json.parent.name}T{stem}"
        frame = next(iter(sorted(result_json.parent.glob(f"{stem}_frame.*"))), None)
        if frame is None:
            raise FeedbackError(f"{camera}: the frame of {result_json.name} is gone from the evidence (quota)")
        for old in [self.root / other / f"{name}{frame.suffix}",  # labelled again: it moves
                    *(self.root / "evidence" / other).glob(f"{name}[._]*")]:
            if old.exists():
                old.unlink()
        out = self.root / folder / f"{name}{frame.suffix}"
        details = self.root / "evidence" / folder
        result = json.loads(result_json.read_bytes())
        record = {"v": SCHEMA_VERSION, "label": fb.label, "event": fb.event, "frame_id": fb.frame_id,
                  "note": fb.note, "by": fb.by, "filed": iso_utc(time.time()), "frame": str(out), "result": result}
        _write(out, frame.read_bytes())
        for suffix in ("_mask.png", "_overlay.jpg"):
            src = result_json.parent / f"{stem}{suffix}"
            if src.is_file():
                _write(details / f"{name}{suffix}", src.read_bytes())
        _write(details / f"{name}.json", json.dumps(record, indent=1).encode())
        return out

    def counts(self) -> dict[str, int]:
        return {f: sum(1 for p in (self.root / f).glob("*") if p.is_file()) if (self.root / f).is_dir() else 0
                for f in LABELS.values()}

    def _report(self, camera: str, fb: Feedback, state: str, **fields) -> None:
        doc = {"v": SCHEMA_VERSION, "camera": camera, "state": state, "label": fb.label, "event": fb.event,
               "frame_id": fb.frame_id, **fields, "totals": self.counts(), "timestamp": iso_utc(time.time())}
        self.app.publisher.publish_retained(topics.state(self.app.cfg.prefix, camera, "feedback"), dumps(doc))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

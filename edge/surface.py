"""The operator's surface of one daemon: score drift (always, unless ``drift.enabled: false``),
and, when ``http:`` asks for them, the live view and Prometheus metrics behind one HTTP server.

The app hands every inspected frame to :meth:`Surface.observe` (inference thread): a drift
window append, a reference kept for the live view, two histogram observations for metrics;
nothing is drawn or encoded here. With ``http.live_view`` and ``http.metrics`` off (the default)
no server, no live view and no metrics objects exist.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import topics
from .drift import DriftMonitor
from .payloads import drift_payload

if TYPE_CHECKING:
    from .app import EdgeApp

log = logging.getLogger(__name__)


class Surface:
    def __init__(self, app: "EdgeApp", bind: bool = True):
        self.app, cfg = app, app.cfg
        self.drift = DriftMonitor(cfg.drift, app.manifest, [c.id for c in cfg.cameras])
        self.liveview = self.metrics = self.server = None
        if cfg.http.live_view:
            from .liveview import LiveView

            self.liveview = LiveView(cfg, raw_frame=self._raw_frame)
        if cfg.http.metrics:
            from .metrics import Metrics

            self.metrics = Metrics(app)  # ConfigError without prometheus_client
            app.publisher.on_published = self.metrics.observe_published
        if cfg.http.enabled and bind:
            from .http_server import HttpServer, Routes

            routes = Routes(cfg.http, [c.id for c in cfg.cameras], self.liveview, self.metrics, self.state,
                            self.set_threshold, self.command)
            self.server = HttpServer(routes)  # binds now: a port in use is a ConfigError (exit 2)

    # -- inference thread --------------------------------------------------------------------
    def observe(self, r) -> None:
        doc = self.drift.observe(r.camera, r.score, r.anomalous)
        if doc is not None:
            self.app.publisher.publish_retained(topics.camera(self.app.cfg.prefix, r.camera, topics.DRIFT),
                                                drift_payload(r.camera, doc))
        if self.liveview is not None:
            self.liveview.offer(r)
        if self.metrics is not None:
            self.metrics.observe(r)

    # -- life --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.server is not None:
            self.server.start()

    def stop(self) -> None:
        if self.liveview is not None:
            self.liveview.close()
        if self.server is not None:
            self.server.stop()

    def threads_alive(self) -> dict[str, bool]:
        return {} if self.server is None else {"HTTP server": self.server.is_alive()}

    # -- for the HTTP server -----------------------------------------------------------------
    def _raw_frame(self, camera: str):
        worker = self.app.captures.get(camera)
        return getattr(worker, "last_raw", None)

    def set_threshold(self, camera: str, payload: bytes) -> str | None:
        """The live view's slider: the same path as ``<prefix>/<camera>/threshold/set``."""
        return self.app.publisher.apply_setting(topics.set_request(self.app.cfg.prefix, camera, "threshold"), payload)

    def command(self, camera: str | None, name: str, payload: bytes) -> str | None:
        """The live view's model and feedback buttons: the same path as ``<prefix>/[<camera>/]<name>/set``."""
        return self.app.publisher.apply_setting(topics.set_request(self.app.cfg.prefix, camera, name), payload)

    def state(self) -> dict:
        """The page's JSON (``/api/state``)."""
        app = self.app
        cameras = []
        for cam in app.cfg.cameras:
            r = self.liveview.latest(cam.id)
            w = app.captures[cam.id]
            cameras.append({
                "id": cam.id, "state": w.state, "detail": w.detail, "fps": app.stats.fps(cam.id),
                "score": None if r is None else round(float(r.score), 4),
                "verdict": None if r is None else ("defect" if r.anomalous else "ok"),
                "frame_id": None if r is None else int(r.frame_id),
                "threshold": app.inference.threshold(cam.id), "alarm": app.publisher.alarms.active(cam.id),
                "alarm_id": app.publisher.alarms.active_id(cam.id),
                "drift": self.drift.snapshot(cam.id), "history": self.liveview.history(cam.id)})
        return {"v": 1, "node": app.cfg.node, "prefix": app.cfg.prefix, "model": app.inference.model_id,
                "backend": app.backend.description, "mqtt_connected": app.publisher.connected, "cameras": cameras}

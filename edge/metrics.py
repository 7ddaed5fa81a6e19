"""Prometheus ``/metrics`` (``http.metrics``; needs ``prometheus_client``: ``haloae[operator]``).

A private registry with one custom collector that reads the daemon's own counters when
Prometheus scrapes (nothing is counted twice, nothing is done per frame for it), plus two
histograms fed per frame: the inference latency and the capture-to-publish latency (from the
frame's capture time to its ``result`` handed to MQTT). Metric names and labels are listed in
docs/operations.md ("Metrics"); docs/grafana-dashboard.json draws them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .config import ConfigError

if TYPE_CHECKING:
    from .app import EdgeApp

log = logging.getLogger(__name__)

INFERENCE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
PUBLISH_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
QUANTILES = (0.5, 0.9, 0.99)


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError("http.metrics: true needs the prometheus_client package: pip install 'haloae[operator]' "
                          "(or python3 -m pip install prometheus_client), or set http.metrics: false") from None
    return prometheus_client


class Metrics:
    """The registry of one daemon; ``render()`` is the ``/metrics`` body."""

    def __init__(self, app: "EdgeApp"):
        pc = _prometheus()
        self._pc, self.app = pc, app
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.inference = pc.Histogram("haloae_inference_latency_seconds", "Model call (per batch) that scored a frame",
                                      ["camera"], buckets=INFERENCE_BUCKETS, registry=self.registry)
        self.publish = pc.Histogram("haloae_capture_to_publish_latency_seconds",
                                    "Capture of a frame to its result handed to MQTT", ["camera"],
                                    buckets=PUBLISH_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(app))
        self.content_type = pc.CONTENT_TYPE_PLAIN_0_0_4

    def observe(self, r) -> None:
        """One inspected frame (inference thread)."""
        ms = (r.latency_ms or {}).get("inference")
        if ms is not None:
            self.inference.labels(r.camera).observe(ms / 1000.0)

    def observe_published(self, r, seconds: float) -> None:
        """One result handed to MQTT (publisher thread)."""
        self.publish.labels(r.camera).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        return self._pc.generate_latest(self.registry)


class _Collector:
    """Reads the app's counters at scrape time."""

    def __init__(self, app: "EdgeApp"):
        self.app = app

    def describe(self):
        return []  # names are known only at collect (cameras); no duplicate checks needed

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        app = self.app
        cams = [c.id for c in app.cfg.cameras]
        info = GaugeMetricFamily("haloae_info", "The daemon: node, model and backend", labels=["node", "model", "backend"])
        info.add_metric([app.cfg.node, app.inference.model_id, app.backend.description], 1)
        yield info

        def per_camera(name, doc, value, kind=CounterMetricFamily):
            fam = kind(name, doc, labels=["camera"])
            for cam in cams:
                fam.add_metric([cam], value(cam))
            return fam

        counts = {cam: app.stats.counts(cam) for cam in cams}
        cap = app.captures
        yield per_camera("haloae_frames_captured", "Good frames read from the source",
                         lambda c: cap[c].frames + app.frames.refused(c))
        yield per_camera("haloae_frames_inspected", "Frames scored by the model", lambda c: counts[c]["inspected"])
        yield per_camera("haloae_frames_anomalous", "Frames judged defect", lambda c: counts[c]["anomalous"])
        yield per_camera("haloae_frames_dropped", "Frames replaced by a newer one before inference (model slower "
                         "than the camera)", lambda c: app.frames.dropped(c))
        yield per_camera("haloae_frames_unusable", "Frames skipped as unusable (undecodable, wrong size or channels)",
                         lambda c: cap[c].errors)
        yield per_camera("haloae_frames_invalid", "Frames whose model outputs were NaN or infinite (not published)",
                         lambda c: counts[c]["invalid"])
        yield per_camera("haloae_camera_up", "1 while the camera delivers frames (state online)",
                         lambda c: float(cap[c].state == "online"), GaugeMetricFamily)
        yield per_camera("haloae_fps", "Frames scored per second (last 10 s)", app.stats.fps, GaugeMetricFamily)
        desk = app.publisher.alarms
        yield per_camera("haloae_alarm_active", "1 while an alarm runs on the camera",
                         lambda c: float(desk.active(c)), GaugeMetricFamily)
        yield per_camera("haloae_alarms_started", "Alarms started", lambda c: desk.started.get(c, 0))
        pub = app.publisher.stats()
        for name, key, doc in (("haloae_alarm_events_raised", "alarm_events", "Alarm events written to the outbox"),
                               ("haloae_alarm_events_delivered", "alarms_delivered", "Alarm events the broker acknowledged"),
                               ("haloae_alarm_events_dead", "alarms_dead", "Alarm events the broker refused (dead letters)"),
                               ("haloae_results_published", "results", "Result messages handed to MQTT"),
                               ("haloae_results_dropped", "dropped", "Results dropped: the publisher queue was full")):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], pub[key])
            yield fam
        for name, value, doc in (("haloae_outbox_pending_events", pub["outbox_pending"], "Alarm events waiting in the "
                                  "outbox for the broker"),
                                 ("haloae_mqtt_connected", float(bool(pub["connected"])), "1 while connected to the broker")):
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        yield self._scores(cams, Metric)
        drift = {cam: app.surface.drift.snapshot(cam) for cam in cams}
        yield per_camera("haloae_score_drift_ratio", "Median score of normal frames / calibration median (NaN before "
                         "the first judgement or without calibration statistics)",
                         lambda c: _num(drift[c].get("ratio")), GaugeMetricFamily)
        yield per_camera("haloae_score_drift", "1 while the camera's scores drift", lambda c: float(
            drift[c].get("state") == "drift"), GaugeMetricFamily)

    def _scores(self, cams, Metric):
        fam = Metric("haloae_score", "Image scores (quantiles over the last 1000 frames; 0.5 = calibrated threshold)",
                     "summary")
        for cam in cams:
            window, total, count = self.app.stats.scores(cam)
            qs = np.quantile(np.asarray(window, np.float64), QUANTILES) if window else [float("nan")] * len(QUANTILES)
            for q, v in zip(QUANTILES, qs):
                fam.add_sample("haloae_score", {"camera": cam, "quantile": str(q)}, float(v))
            fam.add_sample("haloae_score_count", {"camera": cam}, count)
            fam.add_sample("haloae_score_sum", {"camera": cam}, total)
        return fam


def _num(v) -> float:
    return float("nan") if v is None else float(v)

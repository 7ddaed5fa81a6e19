"""Prometheus /metrics (issue 14, "Done when"): scraped twice from a running daemon (real ONNX
Runtime, real mosquitto), the counters move with the frames; off by default: no server at all."""

from __future__ import annotations

import json
import re
import socket

import pytest
from conftest import REPO
from live_helpers import request, running_daemon, wait
from toy_bundle import make_toy_bundle

parser = pytest.importorskip("prometheus_client.parser", reason="needs prometheus_client (haloae[operator])")


def scrape(app) -> dict[tuple[str, tuple], float]:
    status, headers, body = request(app, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for fam in parser.text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cam(name: str, camera: str = "cam0", **labels) -> tuple[str, tuple]:
    return name, tuple(sorted({"camera": camera, **labels}.items()))


def test_metrics_counters_move_with_the_frames(tmp_path, broker):
    bundle = make_toy_bundle(tmp_path / "bundle")
    cameras = [{"id": "cam0", "source": "synthetic", "fps": 20}]  # toy scores ~0.55: defect at 0.5, alarms
    with running_daemon(tmp_path, broker, bundle, cameras, http={"metrics": True}) as app:
        wait(lambda: app.stats.inspected("cam0") >= 10, 20, "10 inspected frames")
        first = scrape(app)
        n1 = first[cam("haloae_frames_inspected_total")]
        wait(lambda: app.stats.inspected("cam0") >= n1 + 20, 20, "20 more frames")
        second = scrape(app)
        assert request(app, "GET", "/")[0] == 404  # the live view is off
    n2 = second[cam("haloae_frames_inspected_total")]
    assert n2 >= n1 + 20
    assert second[cam("haloae_frames_captured_total")] >= n2
    assert second[cam("haloae_frames_anomalous_total")] > first[cam("haloae_frames_anomalous_total")]
    hist = second[cam("haloae_inference_latency_seconds_count")]
    assert hist >= n2 - 1 and second[cam("haloae_inference_latency_seconds_sum")] > 0
    assert second[cam("haloae_inference_latency_seconds_bucket", le="+Inf")] == hist
    pub = second[cam("haloae_capture_to_publish_latency_seconds_count")]
    assert pub > first[cam("haloae_capture_to_publish_latency_seconds_count")]
    assert pub <= second[("haloae_results_published_total", ())]
    assert second[cam("haloae_camera_up")] == 1 and second[("haloae_mqtt_connected", ())] == 1
    assert second[cam("haloae_fps")] > 5
    assert second[cam("haloae_score_count")] == n2
    q50, q99 = second[cam("haloae_score", quantile="0.5")], second[cam("haloae_score", quantile="0.99")]
    assert 0.3 < q50 <= q99 < 1.0
    assert second[cam("haloae_alarms_started_total")] >= 1
    assert second[("haloae_alarm_events_raised_total", ())] >= second[("haloae_alarm_events_delivered_total", ())] >= 1
    assert second[cam("haloae_score_drift")] == 0  # the toy bundle carries no calibration statistics
    # the Grafana dashboard in docs/ asks only for series the daemon serves
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    served = {name for name, _ in second}
    wanted = {m for e in exprs for m in re.findall(r"haloae_[a-z_]+", e)}
    assert wanted and wanted <= served, wanted - served


def test_off_by_default_no_server(tmp_path, broker):
    bundle = make_toy_bundle(tmp_path / "bundle")
    with running_daemon(tmp_path, broker, bundle, [{"id": "cam0", "source": "synthetic", "fps": 20}], http={}) as app:
        wait(lambda: app.stats.inspected("cam0") >= 3, 20, "frames")
        assert app.surface.server is None and app.surface.liveview is None and app.surface.metrics is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", app.cfg.http.port), timeout=2).close()

"""Score drift (issue 14, "Done when"): the synthetic camera's lighting drops, the median score of
normal frames leaves the bundle's calibration median, and the daemon says so (journal, retained
``<prefix>/<camera>/drift``, stats, /metrics). Plus the monitor's rules on their own."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from live_helpers import request, running_daemon, wait
from mqtt_helpers import Subscriber
from toy_bundle import SIZE, make_toy_bundle

from haloae.edge.config_surface import DriftConfig
from haloae.edge.drift import DriftMonitor, baseline_median
from haloae.manifest import Manifest
from haloae.synthetic import LineSimulator

def _manifest(**threshold) -> Manifest:
    return Manifest.create(input_name="image", input_shape=[1, 3, 8, 8], mean=[], std=[],
                           output_names={"score": "score", "anomaly_map": "anomaly_map"}, threshold=threshold,
                           files={"model.onnx": {"sha256": "0" * 64, "bytes": 0}}, model={}, parity={})


MANIFEST = _manifest(raw_image=0.02, normal_scores={"n": 50, "p50": 0.008})  # median 0.2 normalised


def test_baseline_is_the_normalised_calibration_median():
    assert baseline_median(MANIFEST) == pytest.approx(0.2)
    assert baseline_median(_manifest(raw_image=0.02)) is None
    assert baseline_median(_manifest(raw_image=0.02, normal_scores={"p50": "0.01"})) is None
    assert baseline_median(_manifest(normal_scores={"n": 50, "p50": 0.008})) is None


def test_monitor_judges_the_median_of_normal_frames_with_hysteresis():
    mon = DriftMonitor(DriftConfig(factor=1.5, window=40, min_frames=20), MANIFEST, ["cam0"])
    changes = [mon.observe("cam0", 0.21, False) for _ in range(40)]
    firsts = [c for c in changes if c]
    assert len(firsts) == 1 and firsts[0]["state"] == "ok" and firsts[0]["ratio"] == pytest.approx(1.05)
    assert all(mon.observe("cam0", 0.9, True) is None for _ in range(100))  # defect frames are not drift
    changes = [c for c in (mon.observe("cam0", 0.08, False) for _ in range(40)) if c]
    assert [c["state"] for c in changes] == ["drift"] and changes[0]["direction"] == "down"
    assert mon.snapshot("cam0")["ratio"] == pytest.approx(0.4)
    # back to 0.18 (ratio 0.9): inside factor ** 0.8, drift ends
    changes = [c for c in (mon.observe("cam0", 0.18, False) for _ in range(40)) if c]
    assert [c["state"] for c in changes] == ["ok"]
    assert DriftMonitor(DriftConfig(), _manifest(), ["cam0"]).snapshot("cam0") == {"state": "off"}


def _toy_score(rgb: np.ndarray) -> float:
    """What the toy bundle scores a frame (module doc of toy_bundle.py)."""
    small = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return float(small.mean(axis=2).max())


def test_lower_lighting_raises_the_drift_warning(tmp_path, broker, caplog):
    bundle = make_toy_bundle(tmp_path / "bundle")
    sim = LineSimulator(size=256, seed=0, defect_every=3)
    median = float(np.median([_toy_score(sim.frame(i)[0]) for i in range(60)]))
    manifest = json.loads((bundle / "manifest.json").read_text())  # thresholds carry no hash: edit them
    manifest["threshold"]["normal_scores"] = {"n": 60, "p50": median * 0.02 / 0.5}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    cameras = [{"id": "cam0", "source": "synthetic", "fps": 50, "threshold": 5.0,  # every frame judged ok
                "lighting": 0.5, "lighting_from_frame": 120}]
    sub = Subscriber(broker.port, ["haloae/n1/cam0/drift", "haloae/n1/stats"])
    sub.wait_subscribed()
    caplog.set_level(logging.INFO, logger="haloae.edge.drift")
    with running_daemon(tmp_path, broker, bundle, cameras, http={"metrics": True},
                        drift={"window": 60, "min_frames": 40, "factor": 1.3},
                        publish={"zmq_pub": None, "stats_interval_s": 0.5}) as app:
        drift = lambda: [json.loads(p) for t, p, _ in sub.messages if t.endswith("/drift")]  # noqa: E731
        sub.wait_for(lambda m: any(d["state"] == "drift" for d in drift()), timeout=30)
        docs = drift()
        assert docs[0]["state"] == "ok" and docs[0]["ratio"] == pytest.approx(1.0, abs=0.1)  # before the lamp dims
        late = next(d for d in docs if d["state"] == "drift")
        assert late["direction"] == "down" and late["ratio"] < 1 / 1.3  # said as soon as it crosses the factor
        wait(lambda: abs(app.surface.drift.snapshot("cam0")["ratio"] - 0.5) < 0.05, 10, "the median at half light")
        assert late["baseline_median"] == pytest.approx(median, abs=1e-3) and late["v"] == 1
        metrics = wait(lambda: (b := request(app, "GET", "/metrics")[2]) and
                       b'haloae_score_drift{camera="cam0"} 1.0' in b and b, 10, "drift in /metrics")
        assert b"haloae_score_drift_ratio" in metrics
        stats = sub.wait_for(lambda m: any(t.endswith("/stats") and json.loads(p)["cameras"]["cam0"]["drift"]["state"]
                                           == "drift" for t, p, _ in m), timeout=10)
        assert stats
    retained = [r for t, p, r in sub.messages if t.endswith("/drift")]
    assert retained and not any(retained)  # live messages; a new subscriber gets the last one retained
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "score drift" in r.getMessage()]
    assert len(warnings) == 1 and "camera cam0" in warnings[0] and "lighting" in warnings[0]
    sub.close()

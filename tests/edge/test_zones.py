"""Ignore zones: validation, the mask, the rescoring (the same function on the line and in
haloae-eval), and the daemon on the toy bundle: a bright patch inside a zone is no defect."""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
import yaml
from mqtt_helpers import Subscriber, edge_config
from toy_bundle import BRIGHT, MID, make_toy_bundle

from haloae.edge.app import EdgeApp
from haloae.edge.config import ConfigError, load_config
from haloae.edge.infer import check_zones
from haloae.zones import Reduction, ZoneSet, ZonesError, load_zones, parse_zones, reduction_from_model_config
from haloae.manifest import Manifest
from haloae.train import eval_cli, evaluate

SQUARE = [[0, 0], [16, 0], [16, 16], [0, 16]]


@pytest.mark.parametrize("data, says", [
    ({"size": [64, 48], "polygons": [[[0, 0], [10, 0]]]}, "polygons.0: a polygon needs 3"),
    ({"size": [64, 48], "polygons": [[[0, 0], [10, 0], [70, 5]]]}, "polygons.0.2: point [70, 5] is outside the 64x48"),
    ({"size": [64, 48], "polygons": [[[0, 0], [10, 0], [float("nan"), 5]]]}, "polygons.0.2.0: Input should be a finite"),
    ({"size": [64, 48], "polygons": [[[0, 0], [10, 10], [20, 20]]]}, "encloses less than one pixel"),
    ({"size": [64, 48], "polygons": [[["0", 0], [10, 0], [5, 5]]]}, "polygons.0.0.0: Input should be a valid number"),
    ({"size": [64, 48], "border_px": 24}, "border_px 24 leaves nothing of a 64x48 frame"),
    ({"size": [64, 48], "border_px": -1}, "border_px: Input should be greater than or equal to 0"),
    ({"size": [64, 48], "polygons": [[[0, 0], [64, 0], [64, 48], [0, 48]]]}, "cover the whole 64x48 frame"),
    ({"size": [0, 48]}, "size is [width, height]"),
    ({"size": [64, 48], "polygon": []}, "polygon: unknown key"),
    ({"polygons": []}, "size: Field required"),
])
def test_bad_zones_are_refused_with_the_key(data, says):
    with pytest.raises(ZonesError) as err:
        parse_zones(data, "zones.yaml")
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_keep_mask_follows_polygons_border_and_frame_size():
    zones = ZoneSet(parse_zones({"size": [64, 48], "border_px": 2, "polygons": [SQUARE]}))
    keep = zones.keep(64, 48)
    assert keep.shape == (48, 64) and not keep[5, 5] and keep[20, 20]  # inside / outside the square
    assert not keep[0, 30] and not keep[47, 30] and not keep[20, 63] and keep[2, 30]  # the 2-pixel border
    big = zones.keep(128, 96)  # another frame size: the polygons are scaled to it
    assert not big[30, 30] and big[40, 40]
    small = zones.keep(64, 48, 8, 6)  # at the map's resolution: pixel ignored when >= half ignored
    assert small.shape == (6, 8) and not small[0, 0] and not small[1, 1] and small[3, 4]


def test_rescoring_is_the_graph_score_on_the_pixels_left():
    rng = np.random.default_rng(0)
    amap = rng.random((48, 64)).astype(np.float32) * 0.3
    amap[5, 5] = 2.0  # the peak, inside the zone
    amap[30, 40] = 0.9  # the best pixel outside it
    zones = ZoneSet(parse_zones({"size": [64, 48], "polygons": [SQUARE]}))
    c = 0.7  # the graph's score is c * reduce(map) for some calibration constant c
    score, masked = zones.apply(c * 2.0, amap, (64, 48), Reduction("max"))
    assert score == pytest.approx(c * 0.9) and masked[5, 5] == 0 and masked[30, 40] == amap[30, 40]
    top = Reduction("topk", 3)
    score, _ = zones.apply(c * top(amap), amap, (64, 48), top)
    rest = np.sort(amap[zones.keep(64, 48)])[-3:]
    assert score == pytest.approx(c * rest.mean(), rel=1e-5)
    amap[5, 5] = 0.1  # no zone covers the peak: the graph's own score, unchanged
    score, _ = zones.apply(0.63, amap, (64, 48), Reduction("max"))
    assert score == pytest.approx(0.63)


def test_reduction_from_the_model_config():
    assert reduction_from_model_config(None) == Reduction("max", 1)
    assert reduction_from_model_config({"map": {"score": "topk", "topk": 100}}) == Reduction("topk", 100)
    with pytest.raises(ZonesError, match="score='pooled'"):
        reduction_from_model_config({"map": {"score": "pooled"}})


def _zones_file(path, size=(32, 32)):
    path.write_text(yaml.safe_dump({"size": list(size), "polygons": [SQUARE]}))
    return path


def test_config_reads_the_zones_file_and_checks_it(tmp_path, caplog):
    make_toy_bundle(tmp_path / "bundle")
    _zones_file(tmp_path / "zones.yaml")
    cfg = {"node": "n1", "state_dir": "state", "model": {"bundle": "bundle"},
           "cameras": [{"id": "cam0", "source": "synthetic", "ignore_zones": "zones.yaml"}]}
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "edge.yaml")  # relative to the config's folder
    assert loaded.cameras[0].ignore_zones.size == (32, 32)
    cfg["cameras"][0]["roi"] = [0, 0, 40, 30]
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"cameras.0.ignore_zones: size \[32, 32\] differs from the roi's \[40, 30\]"):
        load_config(tmp_path / "edge.yaml")
    (tmp_path / "zones.yaml").write_text("size: [32, 32]\npolygons: [[[0, 0], [1, 0]]]\n")
    cfg["cameras"][0].pop("roi")
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="cameras.0.ignore_zones: .*zones.yaml: polygons.0: a polygon needs 3"):
        load_config(tmp_path / "edge.yaml")
    manifest = Manifest.create(input_name="image", input_shape=[1, 3, 8, 8], mean=[], std=[],
                               output_names={"score": "score", "anomaly_map": "anomaly_map"}, threshold={},
                               files={"model.onnx": {"sha256": "0" * 64, "bytes": 0}},
                               model={"config": {"map": {"score": "pooled"}}}, parity={})
    with pytest.raises(ZonesError):
        check_zones(loaded.cameras, manifest)
    # a fused-map model (map.fine_weight): zones work, and the log says the rescoring is a ratio
    fused = Manifest.create(input_name="image", input_shape=[1, 3, 8, 8], mean=[], std=[],
                            output_names={"score": "score", "anomaly_map": "anomaly_map"}, threshold={},
                            files={"model.onnx": {"sha256": "0" * 64, "bytes": 0}},
                            model={"config": {"map": {"score": "max", "fine_weight": 0.5}}}, parity={})
    with caplog.at_level("INFO", logger="haloae.edge.infer"):
        assert check_zones(loaded.cameras, fused) == Reduction("max", 1, exact=False)
    assert "fused map (map.fine_weight / coarse_weight)" in caplog.text and "cam0" in caplog.text


def _frames(folder, n, patch: bool):
    """PNG frames 32x32 at MID grey; with ``patch`` a BRIGHT square in the top-left 16x16."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((32, 32, 3), MID, np.uint8)
        if patch:
            img[:16, :16] = BRIGHT
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


def _run_daemon(tmp_path, broker, zones):
    """Results of a looping folder camera (results are live data: none before the MQTT connection)."""
    cam = {"id": "cam0", "source": str(tmp_path / "frames"), "kind": "folder", "loop": True, "fps": 20}
    if zones:
        cam["ignore_zones"] = {"size": [32, 32], "polygons": [SQUARE]}
    cfg = edge_config(tmp_path, broker.port, cameras=[cam], model={"bundle": str(tmp_path / "bundle"), "threads": 1})
    sub = Subscriber(broker.port, ["haloae/n1/cam0/result"])
    sub.wait_subscribed()
    app = EdgeApp(cfg)
    app.prepare()
    t = threading.Thread(target=app.run)
    t.start()
    try:
        msgs = sub.wait_for(lambda m: len(m) >= 4, timeout=30)
    finally:
        app.request_stop()
        t.join(10)
        sub.close()
    return [json.loads(p) for _, p, _ in msgs[:4]]


def test_daemon_ignores_a_defect_inside_a_zone_and_eval_scores_the_same(tmp_path, broker):
    make_toy_bundle(tmp_path / "bundle")
    _frames(tmp_path / "frames", 4, patch=True)
    plain = _run_daemon(tmp_path, broker, zones=False)
    assert all(r["verdict"] == "defect" and r["regions"] for r in plain)
    zoned = _run_daemon(tmp_path, broker, zones=True)
    assert all(r["verdict"] == "ok" and r["regions"] == [] for r in zoned), zoned
    assert zoned[0]["score"] == pytest.approx(MID / 255, abs=0.01)  # the best pixel outside the zone
    # haloae-eval --ignore-zones on the same images, same bundle: the same scores as the line
    data = tmp_path / "data"
    _frames(data / "test" / "good", 2, patch=False)
    _frames(data / "test" / "spot", 2, patch=True)
    (data / "ground_truth" / "spot").mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(data / "ground_truth" / "spot" / f"{i:03d}_mask.png"), np.zeros((32, 32), np.uint8))
    scorer = evaluate.bundle_scorer(tmp_path / "bundle", "cpu", 1)
    zones = load_zones(_zones_file(tmp_path / "zones.yaml"))
    with_zones = evaluate.score_dataset(scorer, data, progress=False, zones=zones)
    without = evaluate.score_dataset(scorer, data, progress=False)
    spot = [i for i, c in enumerate(with_zones.classes) if c == "spot"]
    assert all(without.scores[i] >= 0.9 for i in spot)
    assert all(with_zones.scores[i] == pytest.approx(zoned[0]["score"], abs=1e-4) for i in spot)
    assert eval_cli.main(["--bundle", str(tmp_path / "bundle"), "--data", str(data), "--out", str(tmp_path / "rep"),
                          "--threads", "1", "--no-progress", "--ignore-zones", str(tmp_path / "zones.yaml")]) == 0
    (tmp_path / "bad.yaml").write_text("size: [32, 32]\nborder_px: 16\n")
    assert eval_cli.main(["--bundle", str(tmp_path / "bundle"), "--data", str(data), "--out", str(tmp_path / "rep2"),
                          "--ignore-zones", str(tmp_path / "bad.yaml")]) == 2


def test_the_example_zones_file_fits_the_example_camera():
    from conftest import REPO

    zones = load_zones(REPO / "configs" / "edge" / "zones" / "cam1.yaml")
    example = yaml.safe_load((REPO / "configs" / "edge" / "one-camera.yaml").read_text())
    assert list(zones.size) == example["cameras"][0]["roi"][2:]

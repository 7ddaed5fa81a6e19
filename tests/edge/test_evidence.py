"""Evidence files: layout, quota (oldest deleted first), no path escape, disk errors not fatal."""

import os
import time
from pathlib import Path

import pytest
from mqtt_helpers import edge_config, make_result

from haloae.edge.config import ConfigError
from haloae.edge.evidence import EvidenceStore
from haloae.edge.publish import Publisher


def test_quota_deletes_the_oldest_files_first(tmp_path):
    store = EvidenceStore(tmp_path / "ev", quota_bytes=10_000)
    t0 = 1_700_000_000.0
    for i in range(8):
        store.save("cam0", i, t0 + i, {"_frame.jpg": bytes(2000)})
        time.sleep(0.01)
    files = sorted(p.name for p in (tmp_path / "ev").rglob("*.jpg"))
    assert store.total_bytes <= 10_000 and len(files) == 5
    assert files[0].endswith("_3_frame.jpg") and files[-1].endswith("_7_frame.jpg")
    assert store.deleted == 3
    # a new store scans what is there and keeps enforcing the quota
    again = EvidenceStore(tmp_path / "ev", quota_bytes=5_000)
    assert again.total_bytes <= 5_000 and len(list((tmp_path / "ev").rglob("*.jpg"))) == 2


def test_layout_is_camera_then_utc_date(tmp_path):
    store = EvidenceStore(tmp_path / "ev", quota_bytes=10**6)
    folder = store.save("cam-1", 42, 1_700_000_000.5, {"_frame.jpg": b"x", ".json": b"{}"})
    assert folder == tmp_path / "ev" / "cam-1" / "2023-11-14"
    assert sorted(p.name for p in folder.iterdir()) == ["221320.500_42.json", "221320.500_42_frame.jpg"]


@pytest.mark.parametrize("camera", ["../etc", "a/b", "", ".."])
def test_camera_ids_cannot_escape_the_folder(tmp_path, camera):
    store = EvidenceStore(tmp_path / "ev", quota_bytes=10**6)
    with pytest.raises(ValueError, match="not a valid id"):
        store.save(camera, 1, time.time(), {"_frame.jpg": b"x"})
    assert not any((tmp_path).glob("etc*"))


def test_evidence_dir_outside_state_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="evidence.dir: '../../elsewhere' must be a folder name inside state_dir"):
        edge_config(tmp_path, 1883, evidence={"dir": "../../elsewhere"})
    cfg = edge_config(tmp_path, 1883, evidence={"dir": "evidence"})
    link = tmp_path / "state"
    link.mkdir()
    (link / "evidence").symlink_to(tmp_path.parent)  # a link out of state_dir: refused when used
    with pytest.raises(ConfigError, match="escapes state_dir"):
        Publisher(cfg, cfg.state_dir)


def test_a_disk_error_is_counted_not_raised(tmp_path):
    root = tmp_path / "ev"
    store = EvidenceStore(root, quota_bytes=10**6)
    (root / "cam0").write_bytes(b"a file where the camera folder should be")
    assert store.save("cam0", 1, time.time(), {"_frame.jpg": b"x"}) is None
    assert store.errors == 1


def test_publisher_saves_anomalous_frames_with_mask_overlay_and_json(tmp_path, broker):
    cfg = edge_config(tmp_path, broker.port, evidence={"min_interval_s": 0, "frame_format": "png"})
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    pub.publish_result(make_result("cam0", 1, anomalous=False))
    pub.publish_result(make_result("cam0", 2, anomalous=True, blob=(10, 10, 20, 20)))
    deadline = time.monotonic() + 5
    root = Path(cfg.state_dir) / "evidence" / "cam0"
    while len(list(root.rglob("*"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.stop()
    names = sorted(p.name.split("_", 1)[1] for p in root.rglob("*.*"))
    assert names == ["2.json", "2_frame.png", "2_mask.png", "2_overlay.jpg"]
    assert all(os.path.getsize(p) > 0 for p in root.rglob("*.*"))

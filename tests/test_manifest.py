"""The bundle manifest dataclass: the on-disk document round-trips unchanged, every bad field is a
UserError naming its key, and nothing but haloae.manifest reads or writes manifest.json."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from haloae.errors import UserError
from haloae.manifest import (MANIFEST, THRESHOLD_TARGET, BundleError, Manifest, read_manifest)

REPO = Path(__file__).resolve().parents[1]


def _manifest(**threshold) -> Manifest:
    return Manifest.create(
        input_name="image", input_shape=[2, 3, 16, 24], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
        output_names={"score": "score", "anomaly_map": "anomaly_map"},
        threshold={"raw_image": 0.02, "raw_pixel": 0.03, "method": "quantile", "quantile": 0.99,
                   "normal_scores": {"n": 24, "p50": 0.011}, **threshold},
        files={"model.onnx": {"sha256": "ab" * 32, "bytes": 1234, "precision": "fp32"}},
        model={"id": "toy-1", "name": "toy", "config": {"map": {"score": "max"}}}, parity={"samples": 4})


def test_round_trip_through_the_file_is_identical(tmp_path):
    m = _manifest()
    path = m.write(tmp_path)
    assert path.name == MANIFEST
    doc = json.loads(path.read_text())
    back = read_manifest(tmp_path)
    assert back == m and back.to_dict() == doc  # the document survives unchanged
    assert doc["version"] == 1 and doc["format"] == "haloae-bundle"
    assert doc["threshold"]["image"] == THRESHOLD_TARGET and doc["threshold"]["method"] == "quantile"
    assert back.input.hw == (16, 24) and back.batch == 2 and back.anomaly_map.shape == (2, 1, 16, 24)
    assert back.threshold.raw_image == 0.02 and back.threshold.normal_scores["p50"] == 0.011
    assert back.model_config == {"map": {"score": "max"}} and back.model_file("fp16") == "model.onnx"
    assert back.model_id("f" * 64) == "toy-1"


def test_manifest_is_frozen_and_hands_out_copies():
    m = _manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.threshold = None  # type: ignore[misc]
    m.to_dict()["model"]["id"] = "edited"
    assert m.model["id"] == "toy-1"


def test_unknown_top_level_keys_are_kept():
    doc = {**_manifest().to_dict(), "calibration_note": {"by": "line 7"}}
    assert Manifest.from_dict(doc).to_dict() == doc


@pytest.mark.parametrize("key, value, named", [
    ("threshold.image", "0,6", "threshold.image"),
    ("threshold.pixel", 0, "threshold.pixel"),
    ("threshold.raw_image", -1, "threshold.raw_image"),
    ("input.shape", [1, 3, 8], "input.shape"),
    ("input.shape", [1, 1, 8, 8], "input.shape"),
    ("input.name", 7, "input.name"),
    ("input.color", "BGR", "input.color"),
    ("input.scale", 1.0, "input.scale"),
    ("input.mean", ["a"], "input.mean"),
    ("outputs.score.shape", [3], "outputs.score.shape"),
    ("outputs.anomaly_map.name", None, "outputs.anomaly_map.name"),
    ("files.model.onnx.bytes", "12", "files.model.onnx"),
    ("version", 2, "manifest version 2"),
    ("format", "other", "format must be 'haloae-bundle'"),
    ("model", [], "model"),
])
def test_a_bad_field_is_a_user_error_naming_the_key(key, value, named):
    doc = _manifest().to_dict()
    parts = key.split(".")
    if parts[0] == "files":
        doc["files"]["model.onnx"][parts[-1]] = value
    else:
        target = doc
        for p in parts[:-1]:
            target = target[p]
        target[parts[-1]] = value
    with pytest.raises(BundleError) as err:
        Manifest.from_dict(doc, "b/manifest.json")
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    assert named in str(err.value) and "haloae-export" in str(err.value), str(err.value)


def test_only_the_manifest_module_reads_or_writes_manifest_json():
    """No other module of the package opens, parses or writes manifest.json (a file-exists check
    is allowed)."""
    pattern = re.compile(r"""(manifest\.json|MANIFEST).*(read_text|read_bytes|write_text|open\(|json\.)""")
    offenders = []
    for folder in ("haloae", "edge", "train", "export", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "manifest.py" and path.parent.name == "haloae":
                continue
            offenders += [f"{path.relative_to(REPO)}: {line.strip()}" for line in path.read_text().splitlines()
                          if pattern.search(line)]
    assert offenders == [], f"manifest.json read or written outside haloae/manifest.py: {offenders}"

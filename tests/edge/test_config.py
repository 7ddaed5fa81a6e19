"""Bad configs and bad bundles: ``haloae-edge`` prints ONE line naming the key and what to do,
exits with code 2, and never shows a traceback (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, bin_path, run_cli

from haloae.edge.config import load_config


def _config(tmp_path: Path, bundle: Path | str, **over) -> dict:
    cfg = {"node": "t", "state_dir": str(tmp_path / "state"),
           "cameras": [{"id": "cam1", "source": "synthetic"}],
           "model": {"bundle": str(bundle), "threads": 1},
           "publish": {"zmq_pub": None}}
    for key, value in over.items():
        cfg[key] = value
    return cfg


def _run(tmp_path: Path, cfg: dict | str, *extra: str):
    path = tmp_path / "edge.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return run_cli(bin_path("haloae-edge"), "--config", str(path), "--validate-config", *extra, check=False, timeout=60)


def _assert_one_line(proc, kind: str, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"haloae-edge: {kind} error: "), line
    for n in needles:
        assert n in line, line
    return line


@pytest.mark.parametrize("mutate, needles", [
    (lambda c: c["cameras"][0].update(fsp=5), ["cameras.0.fsp: unknown key"]),
    (lambda c: c["cameras"][0].update(fps="fast"), ["cameras.0.fps:", "number"]),
    (lambda c: c["cameras"][0].update(fps=-1), ["cameras.0.fps:", "greater than 0"]),
    (lambda c: c["cameras"][0].update(id="cam 1"), ["cameras.0.id:", "letters, digits"]),
    (lambda c: c["model"].update(bundle="/nonexistent/bundle"), ["model.bundle: no bundle at /nonexistent/bundle",
                                                                  "haloae-export"]),
    (lambda c: c.update(mqtt={"tls": {"ca": "/nonexistent/ca.crt"}}), ["mqtt.tls.ca: cannot read /nonexistent/ca.crt"]),
    (lambda c: c["cameras"].append({"id": "v", "source": "missing.avi"}), ["cameras.1.source: no video file"]),
    (lambda c: c["cameras"].append({"id": "g", "source": "videotestsrc ! appsink", "kind": "gstreamer"}),
     ["cameras.1.source:"]),
    (lambda c: c.update(alarms={"n": 6, "m": 5}), ["alarms:", "must be <= alarms.m"]),
    (lambda c: c["publish"].update(mask_peak_fraction=1), ["publish.mask_peak_fraction:", "less than 1"]),
])
def test_config_errors_one_line_exit_2(tmp_path, mutate, needles):
    bundle = tmp_path / "bundle"  # enough for schema errors; the bundle check comes later
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    cfg = _config(tmp_path, bundle)
    mutate(cfg)
    if cfg["cameras"][-1].get("kind") == "gstreamer":
        import cv2
        if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            pytest.skip("this OpenCV has GStreamer: a pipeline is a valid source here")
    _assert_one_line(_run(tmp_path, cfg), "config", *needles)


def test_unreadable_tls_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file: permissions cannot make it unreadable")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    ca.chmod(0)
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    cfg = _config(tmp_path, bundle, mqtt={"tls": {"ca": str(ca)}})
    _assert_one_line(_run(tmp_path, cfg), "config", "mqtt.tls.ca: cannot read")


def test_not_yaml_and_missing_file(tmp_path):
    _assert_one_line(_run(tmp_path, "node: [unclosed"), "config", "not valid YAML")
    proc = run_cli(bin_path("haloae-edge"), "--config", str(tmp_path / "nope.yaml"), check=False)
    _assert_one_line(proc, "config", "cannot read config")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _edit_manifest(bundle: Path, fn) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_valid_config_and_tampered_bundles(tmp_path, tiny_bundle):
    ok = _run(tmp_path, _config(tmp_path, tiny_bundle))
    assert ok.returncode == 0 and "config OK" in ok.stdout and "onnxruntime" in ok.stdout, ok.stderr

    b = _copy(tiny_bundle, tmp_path / "sha")
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    _assert_one_line(_run(tmp_path, _config(tmp_path, b)), "bundle", "model.bundle:", "sha256")

    b = _copy(tiny_bundle, tmp_path / "shape")
    _edit_manifest(b, lambda m: m["input"].update(shape=[1, 3, 128]))
    _assert_one_line(_run(tmp_path, _config(tmp_path, b)), "bundle", "input.shape")

    b = _copy(tiny_bundle, tmp_path / "version")
    _edit_manifest(b, lambda m: m.update(version=99))
    _assert_one_line(_run(tmp_path, _config(tmp_path, b)), "bundle", "version 99")

    proc = _run(tmp_path, _config(tmp_path, tiny_bundle, model={"bundle": str(tiny_bundle), "backend": "torch"}))
    _assert_one_line(proc, "config", "model.checkpoint")


def test_help_has_examples():
    proc = run_cli(bin_path("haloae-edge"), "--help")
    assert "examples:" in proc.stdout and "--validate-config" in proc.stdout and "exit codes" in proc.stdout


def test_example_configs_parse():
    root = REPO / "configs" / "edge"
    for name in ("one-camera.yaml", "multi-camera.yaml"):
        cfg = load_config(root / name, check=False)
        assert cfg.cameras and cfg.model.bundle.is_absolute()

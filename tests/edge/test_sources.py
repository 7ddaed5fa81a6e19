"""Camera kinds as a registry (edge/sources/): ``kind: auto`` guesses, per-kind keys with their
key path in errors, and every kind module picked up without being listed anywhere."""

from __future__ import annotations

import importlib
import pkgutil
import re
import typing
from pathlib import Path

import pytest
import yaml

from haloae.edge import sources
from haloae.edge.config import ConfigError, EdgeConfig, load_config, parse_config
from haloae.edge.sources import KINDS, CameraConfig, kind_names, parse_camera

REPO = Path(__file__).resolve().parents[2]


def _config(cameras: list[dict]) -> dict:
    return {"node": "t", "cameras": cameras, "model": {"bundle": "/b"}}


@pytest.mark.parametrize("source, kind", [("0", "v4l2"), ("/dev/video2", "v4l2"), ("rtsp://u:pw@cam/s", "url"),
                                          ("https://cam/mjpg", "url"), ("videotestsrc ! appsink", "gstreamer"),
                                          ("synthetic", "synthetic"), ("line.avi", "file")])
def test_auto_guesses_the_kind_from_the_source(source, kind):
    cam = parse_camera({"id": "c", "source": source})
    assert cam.kind == kind and type(cam) is KINDS[kind]
    assert "pw" not in cam.describe()


def test_relative_paths_are_guessed_and_resolved_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "frames").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the config's folder decides, not the working directory
    path = tmp_path / "cfg" / "edge.yaml"
    path.write_text(yaml.safe_dump(_config([{"id": "a", "source": "frames", "loop": True},
                                            {"id": "b", "source": "clip.avi"}])))
    cfg = load_config(path, check=False)
    assert [c.kind for c in cfg.cameras] == ["folder", "file"]
    assert [c.source for c in cfg.cameras] == [str(tmp_path / "cfg" / "frames"), str(tmp_path / "cfg" / "clip.avi")]
    assert cfg.cameras[0].loop


@pytest.mark.parametrize("camera, needles", [
    ({"id": "a", "source": "/dev/video0", "seed": 3}, ["cameras.0.seed: unknown key for a v4l2 camera"]),
    ({"id": "a", "source": "rtsp://cam/s", "loop": True}, ["cameras.0.loop:", "url source is reopened"]),
    ({"id": "a", "source": "synthetic", "defect_every": -1}, ["cameras.0.defect_every:", "greater than or equal"]),
    ({"id": "a", "source": "x", "kind": "webcam"}, ["cameras.0.kind: unknown camera kind 'webcam'", "v4l2", "auto"]),
    ({"id": "a", "source": "lens", "kind": "synthetic"}, ["cameras.0.source: kind synthetic needs source: synthetic"]),
    ({"id": "a", "source": 0}, ["cameras.0.source:", "valid string"]),
])
def test_kind_specific_keys_are_checked_with_their_key_path(camera, needles):
    with pytest.raises(ConfigError) as err:
        parse_config(_config([{"id": "ok", "source": "synthetic"}, camera][1:]))
    for n in needles:
        assert n in str(err.value)


def test_loop_false_stays_valid_for_every_kind():
    for source in ("/dev/video0", "rtsp://cam/s", "a ! appsink", "synthetic", "x.avi"):
        assert parse_camera({"id": "a", "source": source, "loop": False}).loop is False


def test_every_kind_module_is_discovered_and_in_the_config_union():
    folder = Path(sources.__file__).parent
    defined = {}
    for info in pkgutil.iter_modules([str(folder)]):
        module = importlib.import_module(f"haloae.edge.sources.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, CameraConfig) and obj.__module__ == module.__name__
                    and typing.get_origin(obj.model_fields["kind"].annotation) is typing.Literal):
                defined[obj.model_fields["kind"].default] = obj
    assert defined == KINDS and len(KINDS) >= 6
    union = typing.get_args(typing.get_args(EdgeConfig.model_fields["cameras"].annotation)[0])
    assert set(typing.get_args(union[0]) if union else ()) == set(KINDS.values())
    assert len({cls.__module__ for cls in KINDS.values()}) == len(KINDS), "one module per kind"


def test_the_example_config_lists_every_kind():
    text = (REPO / "configs" / "edge" / "one-camera.yaml").read_text()
    line = re.search(r"kind: auto\s+# (.*)", text).group(1)
    assert set(line.replace(" ", "").split("|")) == set(kind_names())

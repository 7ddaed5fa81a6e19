"""The commented example configs in configs/edge/ stay valid against the schema."""

from pathlib import Path

import pytest

from haloae.edge.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "configs" / "edge").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path, monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    cfg = load_config(path, check=False)  # the example's bundle path does not exist here
    assert cfg.cameras and cfg.model.bundle
    assert cfg.prefix.startswith("haloae/")


def test_there_are_examples_for_one_and_several_cameras():
    names = {p.name for p in EXAMPLES}
    assert {"one-camera.yaml", "multi-camera.yaml"} <= names

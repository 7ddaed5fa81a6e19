"""haloae-synth: deterministic synthetic MVTec-layout data with exact masks."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from haloae.synthetic import DEFECT_KINDS
from haloae.train.data import find_mvtec_samples
from haloae.train.synth import generate, main

SMALL = dict(size=64, train=4, test_good=2, test_per_kind=2, progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    generate(tmp_path / "a", seed=7, **SMALL)
    generate(tmp_path / "b", seed=7, **SMALL)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) == 4 + 2 + 2 * 2 * len(DEFECT_KINDS) + 1
    generate(tmp_path / "c", seed=8, **SMALL)
    c = _digest(tmp_path / "c")
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) >= len(a) - 2


def test_layout_loads_and_masks_mark_the_defects(tmp_path):
    root = tmp_path / "d"
    assert main(["--out", str(root), "--seed", "1", "--size", "64", "--train", "3",
                 "--test-good", "2", "--test-per-kind", "2"]) == 0
    train = find_mvtec_samples(root, "train")
    test = find_mvtec_samples(root, "test")
    assert len(train) == 3 and all(s.label == 0 for s in train)
    assert sorted({s.defect_class for s in test}) == sorted(["good", *DEFECT_KINDS])
    for s in test:
        img = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        if s.label:
            mask = cv2.imread(str(s.mask_path), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    # rerunning into its own folder replaces the set (fewer files now)
    assert main(["--out", str(root), "--seed", "1", "--size", "64", "--train", "1",
                 "--test-good", "1", "--test-per-kind", "1"]) == 0
    assert len(find_mvtec_samples(root, "train")) == 1


def test_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["--out", str(tmp_path), "--seed", "0", "--train", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"

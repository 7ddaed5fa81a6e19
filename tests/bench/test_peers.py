"""The benchmark's peer methods (bench/peers.py) on the synthetic set: each must detect the
synthetic defects from the same frozen features HaloAE uses (image AUROC >= 0.9)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from haloae.train import metrics
from haloae.train.data import find_mvtec_samples, read_image, to_model_input
from haloae.train.config import load_model_config
from haloae.train.torch_model import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from peers import Padim, PatchCore, greedy_coreset  # noqa: E402


@pytest.fixture(scope="module")
def features(synth_data):
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny"))

    def feats(split):
        samples = find_mvtec_samples(synth_data, split)
        x = np.stack([to_model_input(read_image(s.path), 128) for s in samples])
        with torch.no_grad():
            return model.backbone.multiscale(torch.from_numpy(x)), \
                np.array([s.label for s in samples])

    (tr, _), (te, y) = feats("train"), feats("test")
    return tr, te, y


def test_padim_detects_synthetic_defects(features):
    tr, te, y = features
    maps = Padim(dims=48).fit(tr).predict(te)
    assert maps.shape == (len(te), 1, 16, 16)
    assert metrics.auroc(y, maps.flatten(1).max(1).values.numpy()) >= 0.9


def test_patchcore_detects_synthetic_defects(features):
    tr, te, y = features
    scores, maps = PatchCore(coreset=2000).fit(tr).predict(te)
    assert maps.shape == (len(te), 1, 16, 16) and scores.shape == (len(te),)
    assert metrics.auroc(y, scores.numpy()) >= 0.9


def test_greedy_coreset_covers_the_bank():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen) * 10
    bank = (centres[:, None] + 0.1 * torch.randn(5, 200, 16, generator=gen)).reshape(-1, 16)
    idx = greedy_coreset(bank, 5, proj_dim=8)
    assert len(set(idx.tolist())) == 5
    # k-center: one point from each well-separated cluster
    assert sorted(set((idx // 200).tolist())) == [0, 1, 2, 3, 4]

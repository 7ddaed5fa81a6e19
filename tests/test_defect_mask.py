"""The defect-mask rule every stage shares (haloae/defect_mask.py): the pixel threshold, then each
connected component cut at a fraction of its own peak."""

import math

import numpy as np
import pytest

from haloae.defect_mask import PEAK_FRACTION, check_peak_fraction, defect_mask


def _bump(shape, cy, cx, peak, sigma):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def test_a_strong_peak_is_cut_at_half_its_maximum_not_where_its_blur_crosses_the_threshold():
    amap = _bump((96, 96), 48, 48, peak=20.0, sigma=8.0).astype(np.float32)  # 40x the threshold
    plain = defect_mask(amap, 0.5, 0.0)
    half = defect_mask(amap, 0.5)
    assert PEAK_FRACTION == 0.5
    # plain: r^2 <= 2 s^2 ln(40); half maximum: r^2 <= 2 s^2 ln(2)
    assert plain.sum() == pytest.approx(math.pi * 2 * 64 * math.log(40), rel=0.05)
    assert half.sum() == pytest.approx(math.pi * 2 * 64 * math.log(2), rel=0.05)
    assert half[48, 48] and not (half & ~plain).any()  # a subset that keeps the peak


def test_each_component_is_cut_at_its_own_peak_and_a_weak_one_keeps_every_seed_pixel():
    strong = _bump((64, 128), 32, 30, peak=10.0, sigma=5.0)
    weak = _bump((64, 128), 32, 100, peak=0.8, sigma=5.0)  # under 2x the threshold: cut below it
    amap = (strong + weak).astype(np.float32)
    mask = defect_mask(amap, 0.5)
    right = np.s_[:, 64:]
    np.testing.assert_array_equal(mask[right], (amap >= 0.5)[right])  # the weak defect as before
    assert mask[right].sum() > 20
    assert (amap[:, :64][mask[:, :64]] >= 5.0).all()  # the strong one at half of its own peak 10


def test_the_cut_never_removes_a_component():
    rng = np.random.default_rng(0)
    import cv2

    for _ in range(20):
        amap = cv2.GaussianBlur(rng.exponential(1.0, (48, 48)).astype(np.float32), (0, 0), 2.0) * 3
        seeds = (amap >= 1.0).astype(np.uint8)
        n, labels = cv2.connectedComponents(seeds, connectivity=8)
        mask = defect_mask(amap, 1.0, 0.7)
        assert not (mask & ~seeds.astype(bool)).any()
        for i in range(1, n):
            assert mask[labels == i].any()


def test_fraction_zero_is_the_plain_threshold_and_bad_fractions_say_what_to_use():
    amap = _bump((32, 32), 16, 16, peak=9.0, sigma=4.0).astype(np.float32)
    np.testing.assert_array_equal(defect_mask(amap, 0.5, 0.0), amap >= 0.5)
    assert not defect_mask(np.zeros((8, 8), np.float32), 0.5).any()
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=r"use a value in \[0, 1\)"):
            check_peak_fraction(bad)

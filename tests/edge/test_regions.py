"""Mask → regions, PNG round trip and overlay (regions.py)."""

import numpy as np
import pytest

from haloae.edge import regions


def test_regions_are_the_connected_components_with_areas_and_peaks():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:20, 5:15] = 255          # 10x10 = 100 px
    mask[40:43, 60:70] = 255         # 3x10 = 30 px
    mask[40, 70] = 255               # 8-connected to the second blob (diagonal neighbour of (39,69)? no: same row)
    mask[0, 79] = 255                # a single pixel, below min_area
    amap = np.zeros((60, 80), np.float32)
    amap[12, 7] = 0.95
    amap[41, 65] = 0.7
    found = regions.find_regions(mask, amap, min_area=2)
    assert found == [{"x": 5, "y": 10, "w": 10, "h": 10, "area": 100, "max_score": 0.95},
                     {"x": 60, "y": 40, "w": 11, "h": 3, "area": 31, "max_score": 0.7}]
    assert len(regions.find_regions(mask, None, min_area=1)) == 3
    assert len(regions.find_regions(mask, None, min_area=1, max_regions=1)) == 1
    assert regions.find_regions(np.zeros((5, 5), np.uint8)) == []


def test_diagonal_pixels_join_one_region():
    mask = np.zeros((10, 10), np.uint8)
    for i in range(5):
        mask[i, i] = 255
    (r,) = regions.find_regions(mask)
    assert (r["w"], r["h"], r["area"]) == (5, 5, 5)


def test_map_is_resized_to_the_frame_before_thresholding():
    small = np.zeros((32, 32), np.float32)
    small[8:16, 16:24] = 1.0          # a quarter-size block at model resolution
    amap = regions.resize_map(small, 128, 64)   # frame 128 x 64 (W x H)
    assert amap.shape == (64, 128)
    mask = regions.binary_mask(amap, 0.5)
    (r,) = regions.find_regions(mask, amap)
    # block covers x 16..24 of 32 -> 64..96 of 128, y 8..16 of 32 -> 16..32 of 64 (± interpolation)
    assert abs(r["x"] - 64) <= 2 and abs(r["w"] - 32) <= 3 and abs(r["y"] - 16) <= 2 and abs(r["h"] - 16) <= 3


def test_mask_png_round_trip_keeps_size_and_values():
    mask = np.zeros((48, 70), np.uint8)
    mask[3:9, 20:33] = regions.MASK_ON
    data = regions.encode_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = regions.decode_png(data)
    assert back.shape == (48, 70) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    with pytest.raises(ValueError, match="not a decodable PNG"):
        regions.decode_png(b"garbage")


def test_overlay_marks_only_defect_pixels():
    frame = np.full((40, 50, 3), 100, np.uint8)
    amap = np.zeros((40, 50), np.float32)
    amap[10:20, 10:20] = 1.0
    mask = regions.binary_mask(amap, 0.5)
    out = regions.overlay_rgb(frame, amap, mask)
    assert out.shape == frame.shape
    assert (out[30:, 30:] == 100).all()             # untouched background
    assert (out[12:18, 12:18] != 100).any()          # heat map blended in
    jpg = regions.encode_jpeg(out)
    assert jpg[:2] == b"\xff\xd8"


def test_analyse_cuts_each_region_at_the_configured_fraction_of_its_peak():
    from types import SimpleNamespace

    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    small = 12.0 * np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 6.0 ** 2))  # model resolution
    r = SimpleNamespace(anomalous=True, anomaly_map=small.astype(np.float32), pixel_threshold=0.5,
                        frame=np.zeros((128, 128, 3), np.uint8), zones=None)
    _, plain, (p,) = regions.analyse(r, peak_fraction=0.0)
    amap, half, (h,) = regions.analyse(r)  # default: half maximum
    assert half.shape == plain.shape == (128, 128)
    assert h["area"] < p["area"] / 3 and h["max_score"] == p["max_score"]
    assert amap[half > 0].min() >= 0.5 * amap.max() - 1e-4

"""The defect mask of an anomaly map: which pixels a result reports as defect.

One rule for every stage that draws or measures a mask (the daemon's `mask` / `regions` /
overlay, `haloae-eval`'s region sizes, the README picture), so what the evaluation measures is
what the line receives.

1. **Seeds**: the pixels at or above the pixel threshold, in 8-connected components.
2. **Each component is cut at a fraction of its own peak** (``peak_fraction``, default 0.5:
   the half-maximum contour). The map is the defect's response blurred by the model's receptive
   field (the stride-16 features see about 200 px; the map is smoothed too), so a strong defect
   lifts the map above the threshold far around itself: on the demo's synthetic defects, which
   peak at 12-20x the threshold, the plain threshold gives masks 12.9x the defect's area
   (median IoU 0.08). The half-maximum contour follows the defect's own extent instead (2.8x,
   IoU 0.36, no defect left uncovered; docs/benchmarks.md, "Defect masks"). A component whose
   peak is under twice the threshold keeps every seed pixel (the cut lies below the
   threshold), so weak defects are reported as before; every component keeps its peak, so the
   cut never removes a region: it shrinks it, and splits it where the map dips under the cut
   between two peaks.

``peak_fraction`` 0 is the plain threshold. Core: numpy + OpenCV only.
"""

from __future__ import annotations

import cv2
import numpy as np

PEAK_FRACTION = 0.5  # half maximum


def check_peak_fraction(value: float) -> float:
    """``value`` as a float in [0, 1); ValueError with the fix otherwise."""
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"mask peak fraction {value!r}: use a value in [0, 1) (0.5 = half maximum, "
                         "0 = every pixel above the pixel threshold)")
    return v


def defect_mask(amap: np.ndarray, pixel_threshold: float, peak_fraction: float = PEAK_FRACTION) -> np.ndarray:
    """bool mask (same shape as the 2-D ``amap``): pixels at or above ``pixel_threshold`` and,
    within their 8-connected component, at or above ``peak_fraction`` x the component's peak."""
    amap = np.asarray(amap, dtype=np.float32)
    seeds = amap >= pixel_threshold
    peak_fraction = check_peak_fraction(peak_fraction)
    if peak_fraction == 0.0 or not seeds.any():
        return seeds
    # only components whose cut lies above the threshold change: skip the labelling otherwise
    if float(amap.max()) * peak_fraction <= pixel_threshold:
        return seeds
    count, labels, stats, _ = cv2.connectedComponentsWithStats(seeds.astype(np.uint8), connectivity=8)
    mask = seeds.copy()
    for i in range(1, count):
        x, y, w, h = (int(v) for v in stats[i, :4])
        box = amap[y:y + h, x:x + w]
        inside = labels[y:y + h, x:x + w] == i
        cut = peak_fraction * float(box[inside].max())
        if cut > pixel_threshold:
            mask[y:y + h, x:x + w] &= ~(inside & (box < cut))
    return mask

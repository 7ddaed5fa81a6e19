"""The live view's picture of one inspected frame: heat map and defect regions over the frame,
ignore zones hatched, the ROI in its source frame, and camera, time, score and verdict written
on it. Drawn only when somebody watches (edge/liveview.py caches it per frame)."""

from __future__ import annotations

import time

import cv2
import numpy as np

from haloae.defect_mask import PEAK_FRACTION

from . import regions

FONT = cv2.FONT_HERSHEY_SIMPLEX
RED, GREEN, YELLOW, CYAN, WHITE = (230, 40, 40), (40, 200, 80), (250, 210, 40), (40, 210, 230), (255, 255, 255)
MIN_SIDE = 360  # smaller pictures are upscaled so that the text stays readable


def _zones(img: np.ndarray, zones, scale: float) -> None:
    """Hatch the ignore zones (polygons and border band) of ``zones`` (a ZoneSet) in place."""
    h, w = img.shape[:2]
    ignored = zones.zones.ignored_mask(w, h) > 0
    hatch = ((np.add.outer(np.arange(h), np.arange(w)) // max(2, int(4 * scale))) % 2 == 0)
    sel = ignored & hatch
    img[sel] = (0.5 * img[sel] + 0.5 * np.array(YELLOW)).astype(np.uint8)
    for poly in zones.zones.scaled_polygons(w, h):
        cv2.polylines(img, [np.round(poly).astype(np.int32)], True, YELLOW, max(1, round(scale)), cv2.LINE_AA)


def draw_result(r, min_area: int, max_regions: int, raw: tuple[np.ndarray, bool] | None = None,
                roi: tuple[int, int, int, int] | None = None, peak_fraction: float = PEAK_FRACTION) -> np.ndarray:
    """RGB picture of FrameResult ``r``; ``raw`` = (the camera's last source frame, is_rgb) to show
    the ROI in context when the camera crops one."""
    amap, mask, found = regions.analyse(r, min_area, max_regions, peak_fraction)
    h, w = r.frame.shape[:2]
    img = regions.overlay_rgb(r.frame, np.zeros((h, w), np.float32) if amap is None else amap,
                              np.zeros((h, w), np.uint8) if mask is None else mask)
    x0 = y0 = 0
    if roi is not None and raw is not None:
        full = raw[0] if raw[1] else cv2.cvtColor(raw[0], cv2.COLOR_BGR2RGB)
        x0, y0, rw, rh = roi
        if full.ndim == 3 and full.shape[0] >= y0 + rh and full.shape[1] >= x0 + rw and (rw, rh) == (w, h):
            canvas = (full[..., :3] * 0.45).astype(np.uint8)  # outside the ROI: dimmed, not inspected
            canvas[y0:y0 + h, x0:x0 + w] = img
            img = canvas
        else:
            x0 = y0 = 0
            roi = None
    scale = max(1.0, MIN_SIDE / min(img.shape[:2]))
    if scale > 1.0:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    img = np.ascontiguousarray(img)
    # the inspected frame's pixels inside the (scaled) picture
    ox, oy = round(x0 * scale), round(y0 * scale)
    iw, ih = round(w * scale), round(h * scale)
    if r.zones is not None:
        _zones(img[oy:oy + ih, ox:ox + iw], r.zones, scale)
    for g in found:
        p1 = (ox + round(g["x"] * scale), oy + round(g["y"] * scale))
        p2 = (ox + round((g["x"] + g["w"]) * scale), oy + round((g["y"] + g["h"]) * scale))
        cv2.rectangle(img, p1, p2, RED, 2)
    if roi is not None:
        cv2.rectangle(img, (ox, oy), (ox + iw - 1, oy + ih - 1), CYAN, 2)
        cv2.putText(img, "ROI", (ox + 4, oy + ih - 6), FONT, 0.5, CYAN, 1, cv2.LINE_AA)
    _caption(img, r)
    return img


def _caption(img: np.ndarray, r) -> None:
    verdict = "DEFECT" if r.anomalous else "OK"
    stamp = time.strftime("%H:%M:%S", time.localtime(r.timestamp)) + f".{int((r.timestamp % 1) * 1000):03d}"
    text = f"{r.camera}  {stamp}  #{r.frame_id}  score {r.score:.3f} / {r.threshold:.2f}"
    fs = 0.7
    while True:  # the largest font at which text and verdict fit side by side
        (tw, th), _ = cv2.getTextSize(text, FONT, fs, 1)
        (vw, _), _ = cv2.getTextSize(verdict, FONT, fs, 2)
        if tw + vw + 24 <= img.shape[1] or fs <= 0.3:
            break
        fs -= 0.05
    bar = th + 12
    img[:bar] = (img[:bar] * 0.3).astype(np.uint8)
    cv2.putText(img, text, (6, th + 5), FONT, fs, WHITE, 1, cv2.LINE_AA)
    cv2.putText(img, verdict, (img.shape[1] - vw - 8, th + 5), FONT, fs,
                RED if r.anomalous else GREEN, 2, cv2.LINE_AA)

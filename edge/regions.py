"""Defect mask → connected regions, the binary mask PNG and the overlay JPEG.

The model's anomaly map comes at the model's input resolution (normalised units: the pixel
threshold maps to 0.5). Everything published is at the *frame* resolution (the frame after the
region-of-interest crop, before the resize to the model input): the map is resized with
bilinear interpolation first and masked second, so the mask edges are smooth and the region
boxes are in frame pixels. The mask rule (the pixel threshold, then each component cut at a
fraction of its own peak: `publish.mask_peak_fraction`) is `haloae.defect_mask`, the same one
`haloae-eval` measures.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from haloae.defect_mask import PEAK_FRACTION, defect_mask

MASK_ON = 255  # value of defect pixels in the mask PNG (background is 0)


def resize_map(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """The anomaly map (H x W float32) resized to ``width`` x ``height`` (bilinear)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim == 3:  # accept 1 x H x W
        amap = amap[0]
    if amap.shape == (height, width):
        return amap
    return cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)


def binary_mask(amap: np.ndarray, pixel_threshold: float, peak_fraction: float = PEAK_FRACTION) -> np.ndarray:
    """uint8 mask (same size as ``amap``): 255 on the defect pixels of `haloae.defect_mask`
    (at or above ``pixel_threshold`` and ``peak_fraction`` x their component's peak), else 0."""
    return np.where(defect_mask(amap, pixel_threshold, peak_fraction), MASK_ON, 0).astype(np.uint8)


def find_regions(mask: np.ndarray, amap: np.ndarray | None = None, min_area: int = 1,
                 max_regions: int = 32) -> list[dict]:
    """Connected components (8-connected) of a binary mask as boxes, largest first.

    Each region is ``{"x", "y", "w", "h", "area", "max_score"}`` in the mask's pixels;
    ``area`` counts mask pixels (not the box), ``max_score`` is the map's maximum inside the
    region (``None`` without ``amap``). Regions smaller than ``min_area`` pixels are dropped;
    at most ``max_regions`` are returned.
    """
    if not mask.any():
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    # stats rows: [x, y, w, h, area]; row 0 is the background
    order = sorted(range(1, count), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    regions = []
    for i in order:
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            break  # sorted by area: the rest are smaller
        peak = None
        if amap is not None:
            inside = labels[y:y + h, x:x + w] == i
            peak = round(float(amap[y:y + h, x:x + w][inside].max()), 4)
        regions.append({"x": x, "y": y, "w": w, "h": h, "area": area, "max_score": peak})
        if len(regions) >= max_regions:
            break
    return regions


def analyse(r, min_area: int = 1, max_regions: int = 32, peak_fraction: float = PEAK_FRACTION
            ) -> tuple[np.ndarray | None, np.ndarray | None, list[dict]]:
    """``(map, mask, regions)`` of a FrameResult at frame resolution, ignore zones applied (map
    and mask are 0 inside them); ``(None, None, [])`` for a frame judged ok (a part judged ok
    carries no defect regions, whatever the camera's threshold) and when no map pixel reaches
    the pixel threshold (no resize needed)."""
    if not r.anomalous or float(np.max(r.anomaly_map)) < r.pixel_threshold:
        return None, None, []
    h, w = r.frame.shape[:2]
    amap = resize_map(r.anomaly_map, w, h)
    if getattr(r, "zones", None) is not None:  # bilinear upsampling leaks across a zone's edge: cut it
        amap = np.where(r.zones.keep(w, h), amap, np.float32(0))
    mask = binary_mask(amap, r.pixel_threshold, peak_fraction)
    return amap, mask, find_regions(mask, amap, min_area, max_regions)


def encode_png(mask: np.ndarray) -> bytes:
    """PNG bytes of a single-channel uint8 mask (fast compression: masks are mostly zeros)."""
    ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a mask of shape {mask.shape} as PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """A mask PNG back to a uint8 array (H x W); raises ValueError on bytes that are not a PNG."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{len(data)} bytes are not a decodable PNG image")
    return img


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB uint8 image."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode an image of shape {rgb.shape} as JPEG")
    return buf.tobytes()


@lru_cache(maxsize=16)
def _zero_png(width: int, height: int) -> bytes:
    return encode_png(np.zeros((height, width), np.uint8))


def mask_png(mask: np.ndarray | None, width: int, height: int) -> bytes:
    """PNG of ``mask`` (None: an empty mask of that size, encoded once per size)."""
    return encode_png(mask) if mask is not None else _zero_png(width, height)


def encode_frame(rgb: np.ndarray, ext: str) -> bytes:
    """The frame as ``png`` (lossless) or ``jpg`` (quality 95) bytes."""
    if ext == "png":
        return encode_png(np.ascontiguousarray(rgb[..., ::-1]))  # cv2 wants BGR
    return encode_jpeg(rgb, 95)


def overlay_jpeg(r, amap: np.ndarray | None, mask: np.ndarray | None, quality: int = 85) -> bytes:
    """JPEG of a FrameResult's overlay; ``amap`` / ``mask`` from :func:`analyse` (None: nothing found)."""
    h, w = r.frame.shape[:2]
    amap = np.zeros((h, w), np.float32) if amap is None else amap
    mask = np.zeros((h, w), np.uint8) if mask is None else mask
    return encode_jpeg(overlay_rgb(r.frame, amap, mask), quality=quality)


def overlay_rgb(frame_rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The frame with a heat map blended in where the mask is set, and region outlines.

    ``amap`` and ``mask`` are at the frame's resolution. The heat map saturates at twice the
    pixel threshold (normalised map value 1.0).
    """
    frame = np.ascontiguousarray(frame_rgb[..., :3], dtype=np.uint8)
    heat = cv2.applyColorMap(np.clip(amap * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(frame, 1.0 - alpha, heat, alpha, 0.0)
    out = np.where(mask[..., None] > 0, blended, frame)
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 0, 0), 1)
    return out

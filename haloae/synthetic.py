"""Synthetic line images: textured parts with and without defects, with exact masks.

Used by ``haloae-synth`` (training data in MVTec AD layout), by the daemon's ``synthetic``
camera source, the demo and export parity, so that camera frames look like the training data.
Core (numpy + OpenCV only): every stage may import it, it runs on the edge device. Everything is
deterministic for a given seed.

The "product" is a brushed, slightly mottled metal plate (fine directional grain, a gentle
illumination gradient, a few fixed machining marks). Defects:

- ``scratch``: thin bright or dark poly-line strokes;
- ``spot``: dark blotches (stains, pits) with soft edges;
- ``cutpaste``: a patch of the surface copied, rotated 90° (grain across) and pasted elsewhere.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFECT_KINDS = ("scratch", "spot", "cutpaste")


def good_surface(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One defect-free part, ``size`` x ``size`` x 3 uint8 RGB."""
    # directional grain: noise blurred much more along x than along y
    grain = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=6.0, sigmaY=0.7)
    grain /= grain.std() + 1e-6
    # low-frequency mottling
    mottle = rng.normal(0.0, 1.0, (size // 16, size // 16)).astype(np.float32)
    mottle = cv2.resize(mottle, (size, size), interpolation=cv2.INTER_CUBIC)
    mottle = cv2.GaussianBlur(mottle, (0, 0), sigmaX=size / 32)
    mottle /= mottle.std() + 1e-6
    # illumination gradient with a random direction
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * 2.0
    base = 128.0 + rng.uniform(-8, 8)
    grey = base + 9.0 * grain + 6.0 * mottle + 10.0 * gradient
    # fixed machining marks: two faint horizontal bands at fixed relative positions
    for rel in (0.3, 0.7):
        y0 = int(rel * size + rng.integers(-2, 3))
        grey[max(y0 - 1, 0): y0 + 2, :] += 6.0
    tint = np.array([1.0, 0.98, 0.95], dtype=np.float32) * rng.uniform(0.97, 1.03)
    rgb = grey[..., None] * tint[None, None, :]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    n_points = int(rng.integers(2, 5))
    start = rng.uniform(0.2, 0.8, 2) * size
    pts = [start]
    for _ in range(n_points - 1):
        step = rng.normal(0, size * 0.12, 2)
        pts.append(np.clip(pts[-1] + step, 4, size - 5))
    pts = np.array(pts, np.int32).reshape(-1, 1, 2)
    thickness = int(rng.integers(2, 4))
    cv2.polylines(mask, [pts], False, 255, thickness=thickness, lineType=cv2.LINE_8)
    value = rng.choice([rng.uniform(20, 60), rng.uniform(200, 240)])
    out = img.astype(np.float32)
    sel = mask > 0
    out[sel] = 0.25 * out[sel] + 0.75 * value
    return out, mask


def _spot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        center = tuple(int(c) for c in rng.uniform(0.15, 0.85, 2) * size)
        axes = tuple(int(a) for a in rng.uniform(0.025, 0.07, 2) * size)
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 1.5)[..., None]
    dark = rng.uniform(0.35, 0.6)
    out = img.astype(np.float32) * (1.0 - soft * (1.0 - dark))
    return out, mask


def _cutpaste(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    mask = np.zeros(img.shape[:2], np.uint8)
    ph, pw = (int(v) for v in rng.uniform(0.12, 0.25, 2) * size)
    sy, sx = (int(rng.integers(0, size - d)) for d in (ph, pw))
    patch = np.rot90(img[sy: sy + ph, sx: sx + pw]).astype(np.float32)  # grain now vertical
    patch = patch * rng.uniform(0.85, 1.15)
    h, w = patch.shape[:2]
    dy, dx = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
    out = img.astype(np.float32)
    out[dy: dy + h, dx: dx + w] = patch
    mask[dy: dy + h, dx: dx + w] = 255
    return out, mask


_DEFECTS = {"scratch": _scratch, "spot": _spot, "cutpaste": _cutpaste}


def add_defect(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, mask)``: a copy of ``img`` with one defect of ``kind`` and its exact
    mask (uint8, 255 on defect pixels)."""
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {', '.join(DEFECT_KINDS)}")
    out, mask = _DEFECTS[kind](img, rng)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def sample(rng: np.random.Generator, size: int = 256, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One part: ``kind=None`` gives a good part with an empty mask."""
    img = good_surface(rng, size)
    if kind is None:
        return img, np.zeros((size, size), np.uint8)
    return add_defect(img, rng, kind)


class LineSimulator:
    """An endless stream of parts as a line camera would see them.

    ``defect_every`` > 0 makes every n-th *run* of ``run_length`` frames defective (the same
    defect kind for the run, a new part each frame), so tests and the demo know exactly which
    frames should raise an alarm: ``is_defective(frame_index)``.
    """

    def __init__(self, size: int = 256, seed: int = 0, run_length: int = 8, defect_every: int = 3):
        self.size, self.seed = size, seed
        self.run_length, self.defect_every = run_length, defect_every

    def is_defective(self, index: int) -> bool:
        if self.defect_every <= 0:
            return False
        return (index // self.run_length) % self.defect_every == self.defect_every - 1

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB frame ``index`` and its mask (deterministic: same seed + index, same frame)."""
        rng = np.random.default_rng([self.seed, index])
        kind = None
        if self.is_defective(index):
            kind = DEFECT_KINDS[(index // self.run_length) % len(DEFECT_KINDS)]
        return sample(rng, self.size, kind)

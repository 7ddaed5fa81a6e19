"""THE preprocessing: image -> model input (core: numpy + OpenCV only). docs/bundle.md.

Every caller uses these functions or their constants: training (``train/data.py``, the
``train_loop`` tensor form :func:`scale_tensor`), calibration, ``haloae-eval``, export parity,
the edge daemon, the report and the README picture. The rule:

1. the image is **RGB** uint8 H x W x 3 (:func:`to_rgb` turns OpenCV's BGR / BGRA / grey into it);
2. resized to the model's (H, W) with :data:`RESIZE` (``cv2.INTER_AREA``; no crop, skipped when
   already that size);
3. float32 times :data:`SCALE` (1/255, the manifest's ``input.scale``);
4. HWC -> CHW; a batch stacks N of them (:func:`to_batch`, zero-padded to a static batch size).
"""

from __future__ import annotations

from typing import Sequence, Union

import cv2
import numpy as np

from .manifest import INPUT_SCALE

SCALE = INPUT_SCALE  # uint8 -> [0, 1]
RESIZE = cv2.INTER_AREA
Size = Union[int, Sequence[int]]  # a square side or (height, width)


def hw(size: Size) -> tuple[int, int]:
    """``(height, width)`` of a square side or a (height, width) pair."""
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def to_rgb(decoded: np.ndarray) -> np.ndarray:
    """An OpenCV-decoded uint8 image (BGR, BGRA, grey H x W or H x W x 1) as RGB H x W x 3."""
    if decoded.ndim == 2:
        return np.ascontiguousarray(np.repeat(decoded[..., None], 3, axis=2))
    if decoded.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(decoded, 3, axis=2))
    if decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    if decoded.shape[2] == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    raise ValueError(f"an image with {decoded.shape[2]} channels: use a grey, RGB or RGBA image")


def resize_rgb(rgb_uint8: np.ndarray, size: Size) -> np.ndarray:
    """RGB uint8 resized to ``size`` with :data:`RESIZE`; unchanged if it already has that size."""
    h, w = hw(size)
    if rgb_uint8.shape[:2] != (h, w):
        rgb_uint8 = cv2.resize(rgb_uint8, (w, h), interpolation=RESIZE)
    return rgb_uint8


def to_model_input(rgb_uint8: np.ndarray, size: Size) -> np.ndarray:
    """RGB uint8 H x W x 3 -> float32 [3, height, width] in [0, 1]."""
    x = resize_rgb(rgb_uint8, size).astype(np.float32) * np.float32(SCALE)  # H, W, 3
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # 3, H, W


def to_batch(images: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """RGB uint8 images -> float32 [N, 3, H, W] of the static ``shape`` (N, 3, H, W); the slots
    after the last image are zeros (their outputs are dropped by the caller)."""
    n, _, h, w = shape
    if len(images) > n:
        raise ValueError(f"{len(images)} images for a batch of {n}")
    batch = np.zeros((n, 3, h, w), np.float32)  # N, 3, H, W
    for i, img in enumerate(images):
        batch[i] = to_model_input(img, (h, w))
    return batch


def scale_tensor(images_uint8):
    """The torch form for training: uint8 [B, 3, H, W] (already resized by :func:`resize_rgb`)
    -> float32 in [0, 1], the same numbers as :func:`to_model_input` (times :data:`SCALE`)."""
    return images_uint8.float().mul_(SCALE)  # B, 3, H, W

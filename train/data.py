"""Data sets: MVTec AD layout and plain folders of images, image reading with clear errors.

Layouts understood:

- MVTec AD: ``<root>/train/good``, ``<root>/test/<class>`` (``good`` or a defect class),
  ``<root>/ground_truth/<class>/<stem>_mask.png`` (one mask per defect image);
- a folder of good images for users' own lines (`find_folder_samples`), with optional
  defect folders and masks;
- for evaluation (`find_eval_samples`) also the layouts plants have: ``<root>/good`` +
  ``<root>/bad`` or ``<root>/good`` + one folder per defect kind, masks optional
  (``<root>/ground_truth/<kind>/`` or ``<root>/masks/<kind>/``). Defect images without a mask
  count for image metrics only.

`check_readable` decodes every file of a sample list and reports ALL unreadable ones in one
`DataError` (one line each), before any model work.

Images become model input through THE preprocessing, ``haloae.preprocess`` (RGB, resize with
INTER_AREA, scale 1/255, HWC -> CHW), the same functions the edge daemon runs (docs/bundle.md).
"""
from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from haloae.errors import UserError
from haloae.preprocess import Size, hw, resize_rgb, to_model_input, to_rgb

_LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
PathLike = Union[str, Path]


@dataclass
class Sample:
    """One image of a data set."""

    path: Path
    label: int  # 0 good, 1 defect
    defect_class: str  # "good" or the defect folder name
    mask_path: Optional[Path] = None  # ground-truth mask (255 = defect), None for good images


class ImageReadError(UserError, ValueError):
    """An image or mask file cannot be read; the message names the file and what to do."""


class DataError(UserError, ValueError):
    """A data folder is missing, empty or inconsistent; the message names it and what to do."""


def _decode(path: Path, flags: int) -> np.ndarray:
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)  # works for non-ASCII paths too
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}; check that the file "
                             "exists and is readable") from exc
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None:
        raise ImageReadError(f"cannot decode image {path}: the file is empty, truncated or not "
                             f"an image ({', '.join(IMAGE_EXTENSIONS)}); replace or remove it")
    return img


def read_image(path: PathLike) -> np.ndarray:
    """Read any image as H x W x 3 uint8 RGB (grey expanded, alpha dropped, 16-bit scaled)."""
    path = Path(path)
    img = _decode(path, cv2.IMREAD_UNCHANGED)
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"{path}: unsupported pixel type {img.dtype}; save it as 8- or "
                             "16-bit PNG/JPEG")
    try:
        return to_rgb(img)
    except ValueError as exc:
        raise ImageReadError(f"{path}: {exc}") from None


def read_mask(path: PathLike, size: Size) -> np.ndarray:
    """Read a mask as height x width float32 in {0, 1} (nearest resize, threshold 127)."""
    h, w = hw(size)
    m = _decode(Path(path), cv2.IMREAD_GRAYSCALE)
    m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return (m > 127).astype(np.float32)


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist; check the --data path")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _images_or_raise(folder: Path, what: str) -> list[Path]:
    files = list_images(folder)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}; put the "
                        f"{what} there")
    return files


def _find_mask(masks: Path, stem: str) -> Optional[Path]:
    for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
        for name in (f"{stem}_mask{ext}", f"{stem}{ext}"):
            if (masks / name).is_file():
                return masks / name
    return None


def _defect_samples(folder: Path, cls: str, masks: Optional[Path],
                    masks_required: bool) -> list[Sample]:
    samples, missing = [], []
    for p in _images_or_raise(folder, f"'{cls}' defect images"):
        mask = _find_mask(masks, p.stem) if masks is not None else None
        if mask is None and masks_required:
            missing.append(p)
        samples.append(Sample(p, 1, cls, mask))
    if missing:
        names = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"no mask in {masks} for defect image(s) {names}{more}; add "
                        "<stem>_mask.png (255 = defect) for each, or remove the images")
    return samples


def find_mvtec_samples(root: PathLike, split: str) -> list[Sample]:
    """Samples of an MVTec AD layout ``root`` for ``split`` "train" (train/good) or "test"."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if split == "train":
        good = root / "train" / "good"
        if not good.is_dir():
            raise DataError(f"{good} does not exist: an MVTec-layout root needs train/good/ with "
                            "defect-free images")
        return [Sample(p, 0, "good") for p in _images_or_raise(good, "defect-free images")]
    test = root / "test"
    classes = sorted(d for d in test.iterdir() if d.is_dir()) if test.is_dir() else []
    if not classes:
        raise DataError(f"{test} has no class folders: expected test/good and test/<defect>")
    samples: list[Sample] = []
    for d in classes:
        if d.name == "good":
            samples += [Sample(p, 0, "good") for p in _images_or_raise(d, "good test images")]
        else:
            samples += _defect_samples(d, d.name, root / "ground_truth" / d.name, True)
    return samples


def find_folder_samples(good_dir: PathLike, defect_dirs: Optional[Iterable[PathLike]] = None,
                        masks_dir: Optional[PathLike] = None) -> list[Sample]:
    """Samples from a folder of good images and optional defect folders (class = folder name).

    Masks, if ``masks_dir`` is given, are ``<masks_dir>/<class>/<stem>_mask.png`` or
    ``<masks_dir>/<stem>_mask.png``; every defect image then needs one.
    """
    samples = [Sample(p, 0, "good") for p in _images_or_raise(Path(good_dir),
                                                              "defect-free images")]
    for d in defect_dirs or ():
        d = Path(d)
        masks = None
        if masks_dir is not None:
            masks = Path(masks_dir) / d.name
            masks = masks if masks.is_dir() else Path(masks_dir)
        samples += _defect_samples(d, d.name, masks, masks_dir is not None)
    return samples


MASK_FOLDERS = ("ground_truth", "masks")  # where an eval layout's optional masks live
_NOT_CLASSES = {*MASK_FOLDERS, "train", "evidence"}  # evidence/: the daemon's feedback details


def _optional_mask_samples(folder: Path, cls: str, root: Path) -> list[Sample]:
    """Defect images of ``folder``, each with its mask if ``<root>/<ground_truth|masks>/<cls>``
    has one (masks are optional: a defect image without one counts for image metrics)."""
    mask_dirs = [root / m / cls for m in MASK_FOLDERS if (root / m / cls).is_dir()]
    samples = []
    for p in _images_or_raise(folder, f"'{cls}' defect images"):
        mask = next((m for m in (_find_mask(d, p.stem) for d in mask_dirs) if m), None)
        samples.append(Sample(p, 1, cls, mask))
    missing = sum(s.mask_path is None for s in samples)
    if mask_dirs and missing:
        _LOG.warning("%d of %d '%s' images have no mask in %s: they count for image metrics "
                     "only", missing, len(samples), cls, mask_dirs[0])
    return samples


def find_eval_samples(root: PathLike) -> list[Sample]:
    """Labelled images for ``haloae-eval`` in the layouts users have.

    - MVTec AD: ``<root>/test/good`` + ``<root>/test/<kind>``, masks in
      ``<root>/ground_truth/<kind>/``;
    - a plant folder: ``<root>/good`` + ``<root>/bad`` or one folder per defect kind, masks in
      ``<root>/ground_truth/<kind>/`` or ``<root>/masks/<kind>/``.

    Masks are optional in both; a defect image without one has ``mask_path`` None.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass a folder with good/ and bad/ "
                        "(or test/good and test/<defect>)")
    base = root / "test" if (root / "test").is_dir() else root
    classes = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and (base is not root or d.name not in _NOT_CLASSES))
    if base is root and (root / "good") not in classes:
        found = ", ".join(f"{d.name}/" for d in classes[:6]) or "no folders"
        raise DataError(f"{root} has no class folders for evaluation (found {found}): lay it out "
                        "as good/ + bad/ (or good/ + one folder per defect kind), or the MVTec "
                        "layout test/good + test/<defect>")
    if not classes:
        raise DataError(f"{base} has no class folders: expected test/good and test/<defect>")
    samples: list[Sample] = []
    for d in classes:
        if d.name == "good":
            samples += [Sample(p, 0, "good") for p in _images_or_raise(d, "good test images")]
        else:
            samples += _optional_mask_samples(d, d.name, root)
    return samples


def find_train_samples(data: PathLike, check: bool = True) -> tuple[list[Sample], str]:
    """Good training images of ``data``: an MVTec-layout root (train/good) or an image folder.

    Returns ``(samples, kind)`` with kind "mvtec" or "folder"; raises `DataError` when empty
    (with a hint at the --data that would work) and, with ``check``, when any file cannot be
    decoded (all of them named at once, before the model is built).
    """
    data = Path(data)
    if (data / "train" / "good").is_dir():
        samples = find_mvtec_samples(data, "train")
        if check:
            check_readable(samples, "training images")
        return samples, "mvtec"
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist; pass an MVTec-layout root "
                        "(with train/good/) or a folder of defect-free images")
    if not list_images(data):
        raise DataError(_no_train_images_hint(data))
    samples = find_folder_samples(data)
    if check:
        check_readable(samples, "training images")
    return samples, "folder"


def _no_train_images_hint(data: Path) -> str:
    """Why ``data`` holds no training images, and the --data that would work."""
    base = f"no images in {data} and no {data / 'train' / 'good'}"
    subdirs = sorted(d for d in data.iterdir() if d.is_dir() and not d.name.startswith("."))
    with_images = [d for d in subdirs if list_images(d)]
    if (data / "good") in with_images:
        n = len(list_images(data / "good"))
        return (f"{base}; {data / 'good'} holds {n} images: train on them with "
                f"--data {data / 'good'} (defect folders stay out of training), or move them to "
                f"{data / 'train' / 'good'} (MVTec layout)")
    if (data / "train") in with_images:
        return (f"{base}; the images are directly in {data / 'train'}: move them to "
                f"{data / 'train' / 'good'} or pass --data {data / 'train'}")
    if with_images:
        names = ", ".join(f"{d.name}/" for d in with_images[:5])
        return (f"{base}; images are only in subfolders ({names}): pass the folder of "
                f"defect-free images itself, e.g. --data {with_images[0]}")
    return f"{base}: pass an MVTec-layout root or a folder of defect-free images"


def check_readable(samples: Sequence[Sample], what: str = "images") -> None:
    """Decode every image and mask of ``samples``; raise one `DataError` that lists every
    unreadable file (one line each) so that a user fixes them all in one go."""
    problems: list[str] = []
    for s in samples:
        try:
            read_image(s.path)
        except ImageReadError as exc:
            problems.append(str(exc))
        if s.mask_path is not None:
            try:
                _decode(s.mask_path, cv2.IMREAD_GRAYSCALE)
            except ImageReadError as exc:
                problems.append(f"mask of {s.path.name}: {exc}")
    if problems:
        n = len(problems)
        head = (f"{n} of {len(samples)} {what} cannot be read (nothing was computed; replace or "
                "remove each and run again):")
        raise DataError("\n".join([head, *(f"  {p}" for p in problems)]))


def split_holdout(samples: Sequence[Sample], fraction: float,
                  seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split into (train, holdout); holdout has round(fraction * n) samples
    (at least 1 when fraction > 0), train keeps at least one."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction {fraction}: use 0 <= fraction < 1")
    order = sorted(samples, key=lambda s: str(s.path))
    random.Random(seed).shuffle(order)
    n_hold = 0 if fraction == 0 else max(1, round(fraction * len(order)))
    n_hold = min(n_hold, len(order) - 1)
    hold = sorted(order[:n_hold], key=lambda s: str(s.path))
    train = sorted(order[n_hold:], key=lambda s: str(s.path))
    return train, hold


def load_images(samples: Sequence[Sample], size: Size, progress: bool = False,
                workers: int = 0) -> torch.Tensor:
    """All images of ``samples`` resized to ``size``: uint8 tensor [N, 3, height, width];
    ``workers`` > 0 decodes in that many threads (OpenCV releases the GIL)."""
    h, w = hw(size)
    out = torch.empty((len(samples), 3, h, w), dtype=torch.uint8)

    def load(s: Sample) -> torch.Tensor:
        return torch.from_numpy(resize_rgb(read_image(s.path), (h, w))).permute(2, 0, 1)

    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    it: Iterable = pool.map(load, samples) if pool is not None else map(load, samples)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(samples), desc="loading images", unit="img", leave=False)
    try:
        for i, x in enumerate(it):
            out[i] = x  # 3, height, width
    finally:
        if pool is not None:
            pool.shutdown()
    return out


class ImageDataset(Dataset):
    """Torch data set over `Sample` s: dict(image, mask, label, defect_class, path)."""

    def __init__(self, samples: Sequence[Sample], size: Size):
        self.samples, self.size = list(samples), hw(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        image = torch.from_numpy(to_model_input(read_image(s.path), self.size))
        if s.mask_path is not None:
            mask = torch.from_numpy(read_mask(s.mask_path, self.size))[None]  # 1, size, size
        else:
            mask = torch.zeros((1, *self.size), dtype=torch.float32)
        return {"image": image, "mask": mask, "label": s.label,
                "defect_class": s.defect_class, "path": str(s.path)}

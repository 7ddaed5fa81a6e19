"""``haloae-synth``: a deterministic synthetic data set in MVTec AD layout.

Images come from the generator the edge daemon's ``synthetic`` camera uses
(`haloae.synthetic`), so demo camera frames look like the training data. Every file is
drawn from its own random stream ``default_rng([seed, split, index])`` and written as PNG:
the same seed gives byte-identical files, and changing one count does not change the others.

Layout: ``train/good``, ``test/good``, ``test/<kind>``, ``ground_truth/<kind>/<stem>_mask.png``
(0 / 255) for kind in scratch, spot, cutpaste.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from haloae import cli
from haloae.synthetic import DEFECT_KINDS, sample
from haloae.errors import UserError

MARKER = "synth.json"
_SPLIT_CODES = {"train": 0, "test": 1}


def _jobs(train: int, test_good: int, test_per_kind: int):
    """(split, kind or None, random-stream index, file number) for every image."""
    for i in range(train):
        yield "train", None, i, i
    for i in range(test_good):
        yield "test", None, i, i
    for k, kind in enumerate(DEFECT_KINDS):
        for i in range(test_per_kind):
            yield "test", kind, 1_000_000 * (k + 1) + i, i


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - OpenCV failure
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def generate(out: Path, seed: int, size: int = 256, train: int = 120, test_good: int = 30,
             test_per_kind: int = 10, progress: bool = True) -> dict:
    """Write the data set into ``out`` (replacing an earlier synthetic set there)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} is not empty and was not written by haloae-synth; "
                                  "choose an empty or new folder")
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(out / sub, ignore_errors=True)
    jobs = list(_jobs(train, test_good, test_per_kind))
    it = jobs
    if progress:
        from tqdm import tqdm
        it = tqdm(jobs, desc="haloae-synth", unit="img")
    for split, kind, index, number in it:
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        img, mask = sample(rng, size, kind)
        folder = out / split / (kind or "good")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{number:03d}"
        _write_png(folder / f"{stem}.png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if kind is not None:
            gt = out / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            _write_png(gt / f"{stem}_mask.png", np.where(mask > 0, 255, 0).astype(np.uint8))
    info = {"generator": "haloae.synthetic", "seed": seed, "size": size, "train": train,
            "test_good": test_good, "test_per_kind": test_per_kind,
            "defect_kinds": list(DEFECT_KINDS)}
    (out / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def _positive(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def _main(argv: Optional[list[str]]) -> int:
    p = argparse.ArgumentParser(
        prog="haloae-synth",
        description="Write a deterministic synthetic MVTec-layout data set (brushed metal "
                    "plates; scratch, spot and cut-paste defects with exact masks) as PNG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  haloae-synth --out data/synth --seed 0\n"
               "  haloae-synth --out /tmp/small --seed 1 --size 128 --train 40 "
               "--test-good 10 --test-per-kind 5\n"
               "then: haloae-train --config configs/train/tiny.yaml --data data/synth "
               "--out runs/tiny")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--seed", required=True, type=int, help="random seed (same seed, same files)")
    p.add_argument("--size", type=_positive, default=256, help="image side in pixels (256)")
    p.add_argument("--train", type=_positive, default=120, help="train/good images (120)")
    p.add_argument("--test-good", type=_positive, default=30, help="test/good images (30)")
    p.add_argument("--test-per-kind", type=_positive, default=10,
                   help=f"defect images per kind ({', '.join(DEFECT_KINDS)}) (10)")
    cli.add_version(p)
    args = p.parse_args(argv)
    if args.size < 32:
        p.error(f"--size {args.size}: use at least 32")
    try:
        generate(args.out, args.seed, args.size, args.train, args.test_good,
                 args.test_per_kind)
    except OSError as exc:  # --out not writable, disk full: the user's to fix
        raise UserError(f"{exc}; check that --out is writable and has space") from exc
    print(f"haloae-synth: wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("haloae-synth", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

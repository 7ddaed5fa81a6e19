"""Accuracy on a real data set: train a config (or take a trained run), evaluate it, write JSON.

Image AUROC, pixel AUROC, AUPRO@0.3, image F1-max, per-class image AUROC, ms/image and the
training time, for the ``edge`` config or any variant. The data set path is an argument
(the benchmarks use the Magnetic Tile Defects set in MVTec layout, ``../shared/data/mtd``).

    python bench/accuracy.py --data ../shared/data/mtd --config configs/train/mtd-edge.yaml --run runs/mtd-edge
    python bench/accuracy.py --data ../shared/data/mtd --run runs/mtd-edge --no-train   # evaluate only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout data set root")
    parser.add_argument("--config", type=Path, default=Path("configs/train/mtd-edge.yaml"))
    parser.add_argument("--run", type=Path, required=True, help="training run folder (final.pt inside)")
    parser.add_argument("--no-train", action="store_true", help="evaluate an existing run only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy.json"))
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not args.no_train:
        t0 = time.monotonic()
        subprocess.run([str(BIN / "haloae-train"), "--config", str(args.config), "--data", str(args.data),
                        "--out", str(args.run), "--threads", str(args.threads)], check=True, env=env)
        print(f"training took {(time.monotonic() - t0) / 60:.1f} min")
    report = args.run / "eval"
    subprocess.run([str(BIN / "haloae-eval"), "--checkpoint", str(args.run / "final.pt"), "--data", str(args.data),
                    "--out", str(report), "--threads", str(args.threads)], check=True, env=env)
    metrics = json.loads((report / "metrics.json").read_text())
    log = (args.run / "log.csv").read_text().strip().splitlines()
    train_s = float(log[-1].split(",")[-1]) if len(log) > 1 else None
    result = {"data": str(args.data), "run": str(args.run), "config": str(args.config),
              "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "train_minutes": train_s and round(train_s / 60, 1),
              **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "per_class",
                                             "ms_per_image", "n_images")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``haloae-train``: train a HaloAE model on defect-free images, calibrate it, write RUN_DIR.

Multi-GPU / multi-process: ``torchrun --nproc_per_node=K -m haloae.train.cli ...``.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from pathlib import Path
from typing import Optional

from haloae import cli

from .config import ConfigError
from .train_config import load_train_config

EXAMPLES = """\
examples:
  # synthetic data + the tiny model (a minute on a laptop CPU)
  haloae-synth --out data/synth --seed 0
  haloae-train --config configs/train/tiny.yaml --data data/synth --out runs/tiny

  # the edge model on an MVTec-layout data set (uses train/good; test/ is for haloae-eval)
  haloae-train --config configs/train/mtd-edge.yaml --data ../shared/data/mtd --out runs/mtd

  # a folder of good images from your line, 2 CPU threads, continue an interrupted run
  haloae-train --config configs/train/mtd-edge.yaml --data /data/line3/good --out runs/line3 --threads 2
  haloae-train --config configs/train/mtd-edge.yaml --data /data/line3/good --out runs/line3 --resume

  # 2 GPUs (or 2 CPU processes with gloo)
  torchrun --nproc_per_node=2 -m haloae.train.cli --config configs/train/mtd-edge.yaml --data DIR --out RUN

RUN_DIR gets log.csv (loss terms per epoch), last.pt (resumable), final.pt (weights, model
config, calibration; load with haloae.train.checkpoint.load_checkpoint) and train_config.yaml.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="haloae-train",
        description="Train a HaloAE model on defect-free images, calibrate it on held-out "
                    "normal images and write a run folder.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path,
                   help="training config YAML (configs/train/*.yaml)")
    p.add_argument("--data", required=True, type=Path,
                   help="MVTec-layout root (train/good is used) or a folder of good images")
    p.add_argument("--out", required=True, type=Path, help="run folder (created)")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (override the config)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N more epochs (continue later with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    return cli.add_version(p)


def _keep_freed_memory() -> None:
    """glibc only: serve blocks up to 32 MB from the heap and keep freed memory (up to 1 GB)
    instead of mmap/munmap-ing every large activation each step. On CPU this removes most
    page-fault (system) time: about 15 % faster training steps. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _main(argv: Optional[list[str]]) -> int:
    args = _parser().parse_args(argv)
    _keep_freed_memory()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = load_train_config(args.config)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seed is not None:
        cfg.seed = args.seed
    if args.threads is not None:
        cfg.threads = args.threads
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after {args.stop_after}: use 1 or more")
    cfg.validate()
    from .train_loop import train  # torch-heavy import after argument checks
    final = train(cfg, args.data, args.out, args.device, args.resume, args.stop_after,
                  progress=not args.quiet).final
    if final is not None:
        print(f"haloae-train: wrote {final}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Exit 0 done, 2 bad input (one line), 1 a failure or a bug (a bug shows its traceback)."""
    return cli.run("haloae-train", _main, argv, interrupted_hint="continue with --resume")


if __name__ == "__main__":
    sys.exit(main())

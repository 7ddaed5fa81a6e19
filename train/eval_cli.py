"""``haloae-eval``: score a test set with a checkpoint or an exported bundle and write a report.

Exit codes: 0 done, 2 bad input (missing / invalid checkpoint, bundle or data, bad arguments).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from haloae import cli
from haloae.defect_mask import PEAK_FRACTION, check_peak_fraction
from haloae.errors import UserError

EXAMPLES = """\
examples:
  # the training-side model on the synthetic set
  haloae-eval --checkpoint runs/tiny/final.pt --data data/synth --out reports/tiny

  # the exported bundle through ONNX Runtime (what the edge runs), same metric code
  haloae-eval --bundle bundles/tiny --data data/synth --out reports/tiny-bundle

  # a plant folder: line7/good/*.png + line7/bad/*.png (or one folder per defect kind);
  # masks optional in line7/ground_truth/<kind>/<name>_mask.png
  haloae-eval --bundle /opt/haloae/bundle --data line7 --out reports/line7

  # MTD, 2 CPU threads, thresholds that maximise F1 on the test set (optimistic)
  haloae-eval --checkpoint runs/mtd/final.pt --data ../shared/data/mtd --out reports/mtd \\
      --threads 2 --calibrate-on test-f1

Layouts of --data: MVTec (test/good, test/<kind>, ground_truth/<kind>) or good/ + bad/ (or
good/ + one folder per defect kind). Defect images without a mask count for the image metrics;
pixel metrics are over the images with masks (report.md says which). Every file is decoded
first: all unreadable ones are listed at once, before the model is loaded (exit 2).

OUT gets metrics.json, report.md, scores.csv, roc.png (log false-positive axis), pr.png,
score_hist.png, worst_false_negatives.png and worst_false_positives.png. Scores are normalised: the calibrated thresholds sit at 0.5
(score = 0.5 * score_raw / raw_image_threshold).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="haloae-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="final.pt written by haloae-train")
    src.add_argument("--bundle", type=Path, help="bundle folder written by haloae-export")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled images: good/ + bad/ (or good/ + <kind>/ folders), or an "
                        "MVTec root (test/<class>/, ground_truth/<class>/); masks optional")
    p.add_argument("--out", type=Path, required=True, help="report folder (created)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime CPU threads (all cores)")
    p.add_argument("--calibrate-on", default="holdout", choices=("holdout", "test-f1"),
                   help="thresholds: holdout = the calibration stored with the model (0.5); "
                        "test-f1 = F1-optimal on this test set")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="bundle graph to run (default fp32)")
    p.add_argument("--batch", type=int, default=8, help="checkpoint batch size (8)")
    p.add_argument("--overlays", type=int, default=4, help="worst cases shown per figure (4)")
    p.add_argument("--mask-peak-fraction", type=float, default=PEAK_FRACTION, metavar="F",
                   help="the daemon's publish.mask_peak_fraction, for the region sizes of the "
                        "predicted masks (default %(default)s: each region cut at half its peak; "
                        "0 = every pixel above the pixel threshold)")
    p.add_argument("--ignore-zones", type=Path, metavar="FILE",
                   help="ignore-zones YAML (polygons in image pixels, border_px), the file the edge camera uses: "
                        "applied to every map and score as on the line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return cli.add_version(p)


def _check_source(args: argparse.Namespace) -> None:
    """The checks of --checkpoint / --bundle that cost no model load (before the data check)."""
    if args.checkpoint is not None and not args.checkpoint.is_file():
        from .checkpoint import CheckpointError
        raise CheckpointError(f"checkpoint {args.checkpoint} not found: pass the final.pt (or "
                              "last.pt) that haloae-train wrote into its --out folder")
    if args.bundle is not None:
        from haloae.bundle import verify_bundle
        verify_bundle(args.bundle)


def _run(args: argparse.Namespace) -> int:
    from haloae.zones import load_zones

    from . import evaluate, report

    if args.threads is not None and args.threads < 1:
        from .ddp import DeviceError
        raise DeviceError(f"--threads {args.threads}: use 1 or more")
    try:
        check_peak_fraction(args.mask_peak_fraction)
    except ValueError as e:
        raise UserError(f"--mask-peak-fraction: {e}") from None
    zones = load_zones(args.ignore_zones) if args.ignore_zones is not None else None
    _check_source(args)  # cheap: the model file is there (a bundle: manifest and hashes)
    samples = evaluate.find_checked_samples(args.data)  # every file decoded before model work
    if args.checkpoint is not None:
        scorer = evaluate.checkpoint_scorer(args.checkpoint, args.device, args.threads,
                                            max(args.batch, 1))
    else:
        scorer = evaluate.bundle_scorer(args.bundle, args.device, args.threads, args.precision)
    if zones is not None:
        scorer.info["ignore_zones"] = str(args.ignore_zones)
    scored = evaluate.score_dataset(scorer, samples, progress=not args.no_progress, zones=zones)
    thresholds = evaluate.choose_thresholds(scored, args.calibrate_on)
    values = evaluate.compute_metrics(scored, thresholds, args.mask_peak_fraction)
    result = report.write_report(args.out, scored, values, thresholds, scorer.source,
                                 scorer.info, args.data, args.overlays, args.mask_peak_fraction)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{scorer.source} {scorer.info.get('model')}: image AUROC {fmt(result['image_auroc'])}"
          f", pixel AUROC {fmt(result['pixel_auroc'])}, AUPRO@0.3 {fmt(result['aupro'])}, "
          f"F1-max {fmt(result['image_f1_max'])}, {result['ms_per_image']:.1f} ms/image")
    print(f"report: {args.out / 'report.md'}")
    return 0


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return _run(args)


def main(argv: list[str] | None = None) -> int:
    return cli.run("haloae-eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""``haloae-retrain``: fold the line's good images into the training set, retrain, compare the new
model with the running bundle side by side, and only then export it for ``model/set``.

Steps (each a file hand-off, as between the stages):

1. ``RUN/data/train/good``: the training images of ``--data`` + the frames the line labelled
   ``ok`` (``--feedback STATE/feedback``: false positives are good parts) + any ``--extra`` folder
   (``haloae-collect`` output); every file decoded first, all unreadable ones listed at once;
2. ``haloae-train`` into ``RUN/train``;
3. the new checkpoint and the ``--current`` bundle are scored with the same code on the
   feedback set (good/ + defect/) and the test set (``--test``, default ``--data`` when it has
   labelled images): ``RUN/compare.md`` and ``compare.json``;
4. the new model passes when its image AUROC on the test set is at most ``--max-auroc-drop``
   below the current one and it raises no more false alarms on the fed-back good frames than
   the current one does; then (or with ``--force``) ``haloae-export`` writes ``RUN/bundle``,
   and the command that promotes it on the box is printed.

Exit codes: 0 exported, 2 bad input, 3 the new model did not pass (nothing exported), 1 a step
failed (or a bug: its traceback is shown).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from haloae import cli
from haloae.errors import EXIT_USER, Failure, UserError
from haloae.manifest import THRESHOLD_TARGET as T

from .data import DataError, check_readable, find_eval_samples, find_folder_samples, find_train_samples

log = logging.getLogger(__name__)

EXIT_NOT_BETTER = 3  # the new model did not pass: nothing exported

EXAMPLES = """\
examples:
  # the line's feedback folder copied from the box, the current bundle, the original data
  haloae-retrain --config configs/train/mtd-edge.yaml --data data/line7 \\
      --feedback /mnt/box/var/lib/haloae-edge/feedback --current bundles/line7-v1 \\
      --out runs/line7-v2 --fp16

  # with newly collected good frames (haloae-collect) and a separate labelled test set
  haloae-retrain --config configs/train/tiny.yaml --data data/synth --extra data/collected \\
      --feedback state/feedback --current bundles/v1 --test data/synth --out runs/v2

Then copy RUN/bundle to the box and promote it without a shell there:
  mosquitto_pub -q 1 -t haloae/<node>/model/set -m /opt/haloae/bundles/<name>
"""


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _step(cmd: list[str], then: str) -> None:
    """Run one stage's CLI; its exit 2 (bad input) stays a user error, anything else a failure."""
    code = subprocess.run(cmd).returncode
    if code != 0:
        kind = UserError if code == EXIT_USER else Failure
        raise kind(f"{Path(cmd[0]).name} exited with {code} (see above); {then}")


def merge_training_set(data: Path, feedback: Path | None, extra: list[Path], out: Path) -> dict[str, int]:
    """Link (or copy) every training image into ``out/train/good``; returns counts per source."""
    sources: list[tuple[str, list]] = [("base", find_train_samples(data, check=False)[0])]
    if feedback is not None and (feedback / "good").is_dir() and any((feedback / "good").iterdir()):
        sources.append(("feedback", find_folder_samples(feedback / "good")))
    for i, folder in enumerate(extra):
        sources.append((f"extra{i}", find_train_samples(folder, check=False)[0]))
    check_readable([s for _, samples in sources for s in samples], "training images")
    good = out / "train" / "good"
    if good.exists():
        shutil.rmtree(good)
    good.mkdir(parents=True)
    counts = {}
    for tag, samples in sources:
        for s in samples:
            target = good / f"{tag}_{s.path.name}"
            try:
                os.link(s.path, target)
            except OSError:
                shutil.copy2(s.path, target)
        counts[tag] = len(samples)
    return counts


def _side(scored) -> dict[str, Any]:
    """What the comparison needs of one model on one set (normalised threshold 0.5)."""
    from . import metrics

    y, s = scored.labels, scored.scores
    good, bad = s[y == 0], s[y == 1]
    both = good.size and bad.size
    return {"images": int(y.size), "good": int(good.size), "defect": int(bad.size),
            "image_auroc": metrics.auroc(y, s) if both else None,
            "false_alarms": int(np.sum(good >= T)), "false_alarm_rate": float(np.mean(good >= T)) if good.size else None,
            "missed": int(np.sum(bad < T)), "recall": float(np.mean(bad >= T)) if bad.size else None,
            "good_score_median": float(np.median(good)) if good.size else None}


def compare(current: Path, candidate: Path, sets: dict[str, Path], threads: int | None) -> dict[str, Any]:
    from . import evaluate

    scorers = {"current": evaluate.bundle_scorer(current, "cpu", threads),
               "new": evaluate.checkpoint_scorer(candidate, "cpu", threads)}
    out: dict[str, Any] = {}
    for name, folder in sets.items():
        samples = evaluate.find_checked_samples(folder)
        out[name] = {who: _side(evaluate.score_dataset(sc, samples, progress=True)) for who, sc in scorers.items()}
        out[name]["folder"] = str(folder)
    out["models"] = {who: sc.info.get("model") for who, sc in scorers.items()}
    return out


def decide(result: dict[str, Any], max_auroc_drop: float) -> tuple[bool, list[str]]:
    """Whether the new model may replace the current one, and why (one line per criterion)."""
    ok, why = True, []
    test = result.get("test")
    if test and test["current"]["image_auroc"] is not None:
        a, b = test["current"]["image_auroc"], test["new"]["image_auroc"]
        passed = b >= a - max_auroc_drop
        ok &= passed
        why.append(f"test image AUROC {a:.4f} -> {b:.4f} ({'ok' if passed else 'worse'}, allowed drop {max_auroc_drop})")
    fb = result.get("feedback")
    if fb and fb["current"]["good"]:
        a, b = fb["current"]["false_alarms"], fb["new"]["false_alarms"]
        passed = b <= a
        ok &= passed
        why.append(f"false alarms on the {fb['current']['good']} fed-back good frames {a} -> {b} "
                   f"({'ok' if passed else 'more'})")
    if fb and fb["current"]["defect"]:
        why.append(f"confirmed defects detected {fb['current']['defect'] - fb['current']['missed']} -> "
                   f"{fb['new']['defect'] - fb['new']['missed']} of {fb['current']['defect']}")
    if not why:
        why.append("nothing to compare on (no test set, no feedback): pass --test")
    return bool(ok), why


def _markdown(result: dict[str, Any], counts: dict[str, int], passed: bool, why: list[str]) -> str:
    f = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Retrain: {result['models']['new']} against {result['models']['current']}", "",
             "Training images: " + ", ".join(f"{k} {v}" for k, v in counts.items()), ""]
    for name in ("feedback", "test"):
        if name not in result:
            continue
        r = result[name]
        lines += [f"## {name} set (`{r['folder']}`)", "", "| | current | new |", "|---|---|---|"]
        for key in ("images", "good", "defect", "image_auroc", "false_alarms", "false_alarm_rate", "missed",
                    "recall", "good_score_median"):
            lines.append(f"| {key} | {f(r['current'][key])} | {f(r['new'][key])} |")
        lines.append("")
    lines += ["## Decision", "", f"**{'promote' if passed else 'keep the current model'}**", "",
              *[f"- {w}" for w in why], ""]
    return "\n".join(lines)


def _has_labelled(folder: Path) -> bool:
    try:
        samples = find_eval_samples(folder)
    except DataError:
        return False
    return any(s.label == 0 for s in samples) and len(samples) > 0


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if not args.current.is_dir():
        raise DataError(f"--current {args.current} is not a bundle folder; pass the bundle the daemon runs")
    out.mkdir(parents=True, exist_ok=True)
    counts = merge_training_set(args.data, args.feedback, args.extra, out / "data")
    print(f"haloae-retrain: training set {out / 'data'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
          file=sys.stderr)
    train = [_bin("haloae-train"), "--config", str(args.config), "--data", str(out / "data"), "--out",
             str(out / "train")]
    for flag, value in (("--epochs", args.epochs), ("--threads", args.threads)):
        if value is not None:
            train += [flag, str(value)]
    _step(train, f"fix it and run haloae-retrain again (--out {out})")
    sets = {}
    if args.feedback is not None and _has_labelled(args.feedback):
        sets["feedback"] = args.feedback
    test = args.test or (args.data if _has_labelled(args.data) else None)
    if test is not None:
        sets["test"] = test
    result = compare(args.current, out / "train" / "final.pt", sets, args.threads)
    passed, why = decide(result, args.max_auroc_drop)
    result.update(passed=passed, reasons=why, training_images=counts)
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "compare.md").write_text(_markdown(result, counts, passed, why))
    for w in why:
        print(f"haloae-retrain: {w}")
    if not passed and not args.force:
        print(f"haloae-retrain: the new model did not pass: nothing exported (see {out / 'compare.md'}; "
              "--force exports anyway)")
        return EXIT_NOT_BETTER
    export = [_bin("haloae-export"), str(out / "train" / "final.pt"), "--out", str(out / "bundle"),
              "--data", str(out / "data")] + (["--fp16"] if args.fp16 else [])
    if args.threads is not None:
        export += ["--threads", str(args.threads)]
    _step(export, f"the checkpoint is in {out / 'train' / 'final.pt'}")
    print(f"haloae-retrain: exported {out / 'bundle'}; copy it to the box and promote it:")
    print(f"  mosquitto_pub -q 1 -t haloae/<node>/model/set -m /opt/haloae/bundles/{out.name}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="haloae-retrain", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="training config YAML")
    p.add_argument("--data", required=True, type=Path, help="the original training data (MVTec root or a folder)")
    p.add_argument("--current", required=True, type=Path, help="the bundle the daemon runs now")
    p.add_argument("--out", required=True, type=Path, help="run folder: data/, train/, compare.md, bundle/")
    p.add_argument("--feedback", type=Path, help="the daemon's state_dir/feedback (good/ + defect/)")
    p.add_argument("--extra", type=Path, action="append", default=[],
                   help="more good images (a haloae-collect --out folder); repeatable")
    p.add_argument("--test", type=Path, help="labelled test set (default: --data when it has one)")
    p.add_argument("--max-auroc-drop", type=float, default=0.01, help="allowed test AUROC drop (0.01)")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--threads", type=int, help="CPU threads for training and scoring")
    p.add_argument("--fp16", action="store_true", help="export the fp16 graph too")
    p.add_argument("--force", action="store_true", help="export even when the new model did not pass")
    return cli.add_version(p)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 exported, 2 bad input, 3 not better (nothing exported), 1 a failure or a bug."""
    return cli.run("haloae-retrain", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy of HaloAE against PaDiM and PatchCore on one data set, in one run, one table.

Trains a HaloAE config (or takes a trained run), scores the MVTec-layout test set with it, fits
PaDiM and PatchCore (`bench/peers.py`) on the same backbone layers at the same grid from the
SAME frozen trunk, and writes every metric as HaloAE / best-peer ratio, per defect class too,
with each method's recall at HaloAE's false-positive rate on the good test images (the rate its
shipped threshold gives). Peers use their papers' feature processing: PaDiM the raw
multi-scale features (no aggregation), PatchCore 3x3 zero-padded local averaging; both train
on ALL good training images (HaloAE holds some out for calibration). By default the peers see
the image as it comes; ``--peer-input model`` passes it through HaloAE's input brightness
normalisation first (``backbone.brightness``), so the lever can be credited to the peers too.

    python bench/accuracy.py --data ../shared/data/mtd --config configs/train/mtd-edge.yaml \\
        --run runs/mtd-edge --threads 2 --out bench/results/accuracy-mtd.json
    python bench/accuracy.py --data ../shared/data/mtd --run runs/mtd-edge --no-train   # evaluate only
    python bench/accuracy.py --data DIR --run RUN --no-train --peers padim --coreset 4096  # quicker
    python bench/accuracy.py --data DIR --run RUN --no-train --peer-input model  # peers on our input

Writes OUT (json) and OUT with .md (the table). Any MVTec-layout folder works as --data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _train(args) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.monotonic()
    subprocess.run([str(BIN / "haloae-train"), "--config", str(args.config), "--data",
                    str(args.data), "--out", str(args.run), "--threads", str(args.threads)],
                   check=True, env=env)
    return time.monotonic() - t0


def _features(model, samples, hw, brightness: bool, batch=16, desc="features"):
    """Trunk features (no aggregation) of ``samples``: [N, C, gh, gw] float32 CPU tensor; with
    ``brightness`` through the model's input brightness normalisation (`backbone.brightness`)."""
    import torch
    from tqdm import tqdm

    from haloae.train.data import read_image, to_model_input

    out = []
    with torch.inference_mode():
        for lo in tqdm(range(0, len(samples), batch), desc=desc, unit="batch", leave=False):
            x = np.stack([to_model_input(read_image(s.path), hw) for s in samples[lo:lo + batch]])
            out.append(model.backbone.multiscale(torch.from_numpy(x), brightness).float())
    return torch.cat(out)


def threshold_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """The threshold that flags ``fpr`` of the good images (labels 0): just above the good score
    that many of them exceed (``scores > threshold`` is the verdict)."""
    good = np.sort(scores[labels == 0])
    k = int(np.floor(fpr * len(good)))
    return float(good[-k - 1]) if k < len(good) else -np.inf


def _metrics(scored, scores, maps, fpr_target: float) -> dict:
    """Every metric of one method on the test set (scores [N], maps [N, H, W])."""
    from haloae.train import metrics

    y, classes = scored.labels, np.array(scored.classes)
    pred = scores > threshold_at_fpr(scores, y, fpr_target)
    per_class, recall, aupro_class = {}, {}, {}
    for c in sorted(set(scored.classes) - {"good"}):
        sel = (classes == "good") | (classes == c)
        per_class[c] = metrics.auroc(y[sel], scores[sel])
        recall[c] = float(pred[(classes == c) & (y == 1)].mean())
        aupro_class[c] = metrics.aupro(scored.masks[sel], maps[sel], max_fpr=0.3)
    # AUPRO pools the false positives of ALL test images: how far the map rises on the normal
    # pixels of defective images (above the good images' 95th pixel percentile) explains a
    # pooled AUPRO below the per-class ones
    good_q95 = float(np.quantile(maps[y == 0], 0.95))
    normal_of_defective = maps[y == 1][scored.masks[y == 1] == 0]
    return {"image_auroc": metrics.auroc(y, scores),
            "pixel_auroc": metrics.pixel_auroc(scored.masks, maps),
            "aupro": metrics.aupro(scored.masks, maps, max_fpr=0.3),
            "image_f1_max": metrics.f1_max(y, scores)[0], "per_class": per_class,
            "aupro_per_class": aupro_class,
            "defective_normal_pixels_above_good_q95": float((normal_of_defective > good_q95).mean()),
            "at_fpr": {"false_positive_rate": float(pred[y == 0].mean()),
                       "recall": float(pred[y == 1].mean()), "recall_per_class": recall}}


def _peer_maps(name: str, tr, te, args, cfg):
    """Fit a peer on training features and return (scores, maps [N, H, W], fit s, ms/img)."""
    import torch.nn.functional as F

    from haloae.train.anomaly_map import smooth, upsample
    from peers import Padim, PatchCore

    t0 = time.perf_counter()
    if name == "padim":
        model = Padim(dims=args.padim_dims, seed=0).fit(tr)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        grid = model.predict(te)
        scores = None
    else:  # PatchCore's local neighbourhood aggregation: 3x3, zero padded
        pool = lambda f: F.avg_pool2d(f, 3, stride=1, padding=1)  # noqa: E731
        model = PatchCore(coreset=args.coreset, progress=True).fit(pool(tr))
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores, grid = model.predict(pool(te))
    maps = upsample(smooth(grid, cfg.map, cfg.hw), cfg.hw)[:, 0]
    ms = 1000 * (time.perf_counter() - t1) / len(te)
    s = maps.flatten(1).max(dim=1).values if scores is None else scores
    return s.numpy(), maps.numpy(), fit_s, ms


def _table(res: dict) -> str:
    names = list(res["methods"])
    best = res["best_peer"]
    cols = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max"]
    classes = list(res["methods"]["haloae"]["per_class"])
    head = ["method", *cols, *[f"{c} AUROC" for c in classes], "recall @ FPR", "ms/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        m = res["methods"][n]
        row = [n, *[f"{m[c]:.3f}" for c in cols], *[f"{m['per_class'][c]:.3f}" for c in classes],
               f"{m['at_fpr']['recall']:.3f} @ {m['at_fpr']['false_positive_rate']:.3f}",
               f"{m['ms_per_image']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    r = res["ratio_vs_best_peer"]
    lines.append("| **HaloAE / best peer** | " + " | ".join(
        [*[f"{r[c]:.3f}" for c in cols], *[f"{r['per_class'][c]:.3f}" for c in classes],
         f"{r['recall']:.3f}", ""]) + " |")
    lines += ["", f"Peer input: {res.get('peer_input', 'raw')}. Best peer per metric: {best}. "
              f"HaloAE at or above the best peer on every metric: "
              f"**{res['haloae_at_or_above_best_peer']}**."]
    # localisation per class: AUPRO on the good + one class images, and how much of the
    # normal area of defective images the map raises (it counts against the pooled AUPRO)
    lines += ["", "| method | pooled AUPRO | " + " | ".join(f"{c} AUPRO" for c in classes)
              + " | normal pixels of defective images above the good images' q0.95 |",
              "|" + "---|" * (len(classes) + 3)]
    for n in names:
        m = res["methods"][n]
        lines.append(f"| {n} | {m['aupro']:.3f} | " + " | ".join(
            f"{m['aupro_per_class'][c]:.3f}" for c in classes)
            + f" | {m['defective_normal_pixels_above_good_q95']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout data set root")
    parser.add_argument("--config", type=Path, default=Path("configs/train/mtd-edge.yaml"))
    parser.add_argument("--run", type=Path, required=True, help="training run folder (final.pt inside)")
    parser.add_argument("--no-train", action="store_true", help="evaluate an existing run only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default="padim,patchcore", help="comma list (padim,patchcore)")
    parser.add_argument("--padim-dims", type=int, default=100)
    parser.add_argument("--coreset", type=int, default=16384, help="PatchCore coreset size")
    parser.add_argument("--peer-input", choices=("raw", "model"), default="raw",
                        help="raw: the peers see the image as it comes (their published form); "
                             "model: through HaloAE's input brightness normalisation too "
                             "(backbone.brightness), to see what that lever gives them")
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy.json"))
    args = parser.parse_args(argv)

    import torch

    from haloae.train import evaluate
    from haloae.train.checkpoint import load_checkpoint
    from haloae.train.data import find_mvtec_samples

    torch.set_num_threads(args.threads)
    train_s = _train(args) if not args.no_train else None
    ckpt_path = args.run / "final.pt"
    scorer = evaluate.checkpoint_scorer(ckpt_path, "cpu", args.threads)
    scored = evaluate.score_dataset(scorer, args.data)
    ours = evaluate.compute_metrics(scored, evaluate.choose_thresholds(scored, "holdout"))
    fpr = ours["at_threshold"]["false_positive_rate"]
    res = {"data": str(args.data), "run": str(args.run), "config": str(args.config),
           "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "methods": {}}
    if train_s is not None:
        res["train_minutes"] = round(train_s / 60, 1)
    log = args.run / "log.csv"
    if log.is_file():
        rows = log.read_text().strip().splitlines()
        res["train_loop_minutes"] = round(float(rows[-1].split(",")[-1]) / 60, 1)
    m = _metrics(scored, scored.scores, scored.maps, fpr)
    m["ms_per_image"] = scored.ms_per_image
    m["at_threshold"] = ours["at_threshold"]  # at the SHIPPED threshold (what the line sees)
    res["methods"]["haloae"] = m

    model, _ = load_checkpoint(ckpt_path)
    cfg = model.cfg
    same = args.peer_input == "model"
    tr = _features(model, find_mvtec_samples(args.data, "train"), cfg.hw, same, desc="peer train features")
    te = _features(model, find_mvtec_samples(args.data, "test"), cfg.hw, same, desc="peer test features")
    res["peer_input"] = args.peer_input
    for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
        print(f"fitting {name} ...", flush=True)
        s, mp, fit_s, ms = _peer_maps(name, tr, te, args, cfg)
        pm = _metrics(scored, s, mp, fpr)
        pm.update(ms_per_image=ms, fit_s=round(fit_s, 1))
        res["methods"][name] = pm

    peers = [n for n in res["methods"] if n != "haloae"]
    ratio, best, ok = {"per_class": {}}, {}, True
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        b = max(peers, key=lambda n: res["methods"][n][key])
        best[key] = b
        ratio[key] = m[key] / res["methods"][b][key]
        ok &= ratio[key] >= 1.0
    for c in m["per_class"]:
        b = max(peers, key=lambda n: res["methods"][n]["per_class"][c])
        ratio["per_class"][c] = m["per_class"][c] / res["methods"][b]["per_class"][c]
        ok &= ratio["per_class"][c] >= 1.0
    rb = max(peers, key=lambda n: res["methods"][n]["at_fpr"]["recall"])
    ratio["recall"] = m["at_fpr"]["recall"] / max(res["methods"][rb]["at_fpr"]["recall"], 1e-9)
    res.update(best_peer=best, ratio_vs_best_peer=ratio, haloae_at_or_above_best_peer=bool(ok))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    table = _table(res)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

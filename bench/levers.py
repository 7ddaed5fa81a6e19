"""Lever study for the anomaly map: which error form, normalisation and code size help.

Works on CACHED Block A trunk features, so a study of many map forms costs one backbone pass:

    python bench/levers.py cache --data ../shared/data/mtd --out runs/levers/mtd
    python bench/levers.py study --cache runs/levers/mtd --epochs 10 --levels 4 --noise 0.5 \\
        --out bench/results/levers-mtd-l4.json
    python bench/levers.py study --cache runs/levers/mtd --epochs 10 --levels 2 --dim 128 \\
        --bottleneck 64 --out bench/results/levers-mtd-l2.json

``study`` trains Block C alone (the project's `HaloAutoEncoder`, MSE on standardised
aggregated features, Gaussian input noise ``--noise``, dropout ``--drop``) on the good training
images minus a seeded holdout, then scores the test set with every map form, with the project's
functions (`error_map`, `smooth`, `upsample`, `PositionGaussian`):

- ``mse``: the paper's channel mean of squared error; ``+pos``: normalised per position with
  the held-out images' maps;
- ``gauss-dD-kK``: position-wise Gaussian of training residuals, D channels, K least-variance
  directions (K = D: full Mahalanobis);
- ``padim-agg`` / ``padim-raw``: PaDiM on the same aggregated / raw features (reference rows).

``checkpoint`` takes a trained run instead (its Block C, its held-out split) and re-scores the
test set post hoc with other Gaussian ranks / eps / cells and smoothing sigmas (position statistics
refitted on the run's held-out images each time):

    python bench/levers.py checkpoint --run runs/mtd-edge --data ../shared/data/mtd \
        --gaussians 64:0.01,176:0.01,176:0.1 --sigmas 0,4,8 --out bench/results/levers-mtd-ckpt.json

``inputs`` re-scores a trained run with each image normalised before the model (gain,
standardised, flat-field, gamma; its Block C as trained, Gaussian and position statistics
refitted on the transformed images):

    python bench/levers.py inputs --run runs/mtd-edge --data ../shared/data/mtd \
        --out bench/results/levers-mtd-inputs.json

``maps`` fuses a trained run's full-Gaussian map with other terms (the high-variance Gaussian
directions, the finer layers' own Gaussian - ``map.fine_weight`` - and with it the coarse cells'
Gaussian - ``map.coarse_weight`` -, a coarse residual Gaussian,
a fine stride-4 PaDiM term, PaDiM on the raw
features) and tries subtracting part of each image's own background; its rows carry the
per-class AUPRO that explains a pooled one:

    python bench/levers.py maps --run runs/mtd-edge --data ../shared/data/mtd \
        --out bench/results/levers-mtd-maps.json

``few`` asks how the position-wise Gaussian fares with few good images (a new line may have a
hundred): its Gaussian is fitted on N of the run's training images and its position statistics
on N/3 of its held-out ones (a set of 4N/3 good images with the default 25 % holdout, or
``--holdout h``: N h / (1 - h)), over all channels or a seeded random subset of D of them,
beside PaDiM fitted on the same 4N/3 images (Block C stays the one trained on all; the rows
isolate the estimate); ``--pool`` adds the Gaussian fitted on all 4N/3 images, PaDiM's way,
with position statistics from 5-fold out-of-fold maps:

    python bench/levers.py few --run runs/mtd-edge-v4 --data ../shared/data/mtd \
        --images 60,100,200,427 --dims 0,100,64 --out bench/results/levers-mtd-few.json

``scores`` keeps a trained run's map and tries other image scores on it: the max, top-k means,
the max of an average-pooled map, and the max plus f x w x the map mean (w from the held-out
maps; the shipped `map.score: max_mean` is f = 1):

    python bench/levers.py scores --run runs/mtd-edge-v4 --data ../shared/data/mtd \
        --out bench/results/levers-mtd-scores.json

It prints and writes one row per form: image / pixel AUROC, AUPRO@0.3 (pooled and per class),
per-class AUROC, and the share of the normal pixels of defective images that the map raises
above the good images' 95th pixel percentile (`bench/accuracy.py` reports the same).
Research tool: the numbers go to docs/benchmarks.md, the shipped model is configured in
configs/model/edge.yaml.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cache(args) -> int:
    import torch
    from tqdm import tqdm

    from haloae.train.config import load_model_config
    from haloae.train.data import find_mvtec_samples, read_image, read_mask, to_model_input
    from haloae.train.torch_model import create_model

    torch.set_num_threads(args.threads)
    model = create_model(load_model_config(args.model)).eval()
    hw = model.cfg.hw
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        samples = find_mvtec_samples(args.data, split)
        feats = []
        with torch.inference_mode():
            for lo in tqdm(range(0, len(samples), 16), desc=split, unit="batch"):
                x = np.stack([to_model_input(read_image(s.path), hw) for s in samples[lo:lo + 16]])
                feats.append(model.backbone.multiscale(torch.from_numpy(x)).half())
        torch.save({"features": torch.cat(feats), "labels": [s.label for s in samples],
                    "classes": [s.defect_class for s in samples],
                    "masks": (np.stack([read_mask(s.mask_path, hw) if s.mask_path else
                                        np.zeros(hw, np.float32) for s in samples]).astype(np.uint8)
                              if split == "test" else None),
                    "model": args.model}, args.out / f"{split}.pt")
    print(f"cached trunk features in {args.out}")
    return 0


def _evaluate(name, grid, test, cfg, rows):
    from haloae.train.anomaly_map import smooth, upsample

    _row(name, upsample(smooth(grid.float(), cfg.map, cfg.hw), cfg.hw)[:, 0].numpy(), test, rows)


def _row(name, maps, test, rows):
    """One result row of full-size ``maps`` (image score: the map maximum): image / pixel AUROC,
    AUPRO (pooled and per class), per-class AUROC and the raised-background figure, all from
    `accuracy._metrics` (the accuracy table's own functions)."""
    from types import SimpleNamespace

    from accuracy import _metrics

    scored = SimpleNamespace(labels=np.asarray(test["labels"]), classes=list(test["classes"]),
                             masks=test["masks"])
    m = _metrics(scored, maps.reshape(len(maps), -1).max(1), maps, 0.05)
    r = {"form": name, "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
         "aupro": m["aupro"], **m["per_class"],
         **{f"aupro_{c}": v for c, v in m["aupro_per_class"].items()},
         "raised_background": m["defective_normal_pixels_above_good_q95"]}
    rows.append(r)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else str(v) for k, v in r.items()),
          flush=True)


def study(args) -> int:
    import torch
    import torch.nn.functional as F

    from haloae.train.anomaly_map import error_map
    from haloae.train.config import load_model_config
    from haloae.train.position_gaussian import PositionGaussian
    from haloae.train.torch_model import HaloAutoEncoder
    from peers import Padim

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    # our own cache (numpy masks inside): not a weights-only file
    train = torch.load(args.cache / "train.pt", weights_only=False)
    test = torch.load(args.cache / "test.pt", weights_only=False)
    d = load_model_config(train["model"]).to_dict()
    d["halo"].update(levels=args.levels, dim=args.dim, bottleneck_dim=args.bottleneck)
    from haloae.train.config import ModelCfg
    cfg = ModelCfg.from_dict(d)
    k = cfg.backbone.aggregate if args.aggregate is None else args.aggregate

    def agg(f):
        return F.avg_pool2d(f.float(), k, 1, k // 2, count_include_pad=False)

    raw_tr, raw_te = train["features"].float(), test["features"].float()
    perm = torch.randperm(len(raw_tr), generator=torch.Generator().manual_seed(args.seed))
    n_hold = round(args.holdout * len(raw_tr))
    tr, ho, te = agg(raw_tr[perm[n_hold:]]), agg(raw_tr[perm[:n_hold]]), agg(raw_te)
    mu, sd = tr.mean((0, 2, 3), keepdim=True), tr.std((0, 2, 3), keepdim=True) + 1e-6
    tr, ho, te = (tr - mu) / sd, (ho - mu) / sd, (te - mu) / sd
    ae = HaloAutoEncoder(tr.shape[1], cfg.level_sides(), cfg.level_blocks(), cfg.halo)
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, weight_decay=1e-5)
    steps = args.epochs * (len(tr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(steps, 1),
                                                pct_start=0.05)
    t0 = time.time()
    for ep in range(args.epochs):
        ae.train()
        order, total = torch.randperm(len(tr)), 0.0
        for i in range(0, len(tr) - args.batch + 1, args.batch):
            y = tr[order[i:i + args.batch]]
            x = y + args.noise * torch.randn_like(y) if args.noise > 0 else y
            x = F.dropout(x, args.drop) if args.drop > 0 else x
            loss = F.mse_loss(ae(x), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {ep + 1}: loss {total / max(len(tr) // args.batch, 1):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    ae.eval()

    def rec(f):
        with torch.no_grad():
            return torch.cat([ae(f[i:i + 32]) for i in range(0, len(f), 32)])

    r_tr, r_ho, r_te = tr - rec(tr), ho - rec(ho), te - rec(te)
    rows: list[dict] = []

    def posnorm(e_ho, e_te):  # before the smoothing `_evaluate` applies
        return _posnorm(e_te, e_ho, 0, cfg.hw)

    mse_cfg = cfg.map.model_copy(update={"error": "mse"})
    mse = lambda f, r: error_map(f, f - r, mse_cfg)  # noqa: E731
    _evaluate("mse", mse(te, r_te), test, cfg, rows)
    _evaluate("mse+pos", posnorm(mse(ho, r_ho), mse(te, r_te)), test, cfg, rows)
    for dims, rank in [(0, 0), (100, 100), (100, 32), (0, 64), (0, 96)]:
        g = PositionGaussian(tr.shape[1], cfg.backbone.grid_hw, dims, rank, eps=0.01)
        g.fit([r_tr])
        name = f"gauss-d{g.dims}-k{g.rank}"
        _evaluate(name, g(r_te), test, cfg, rows)
        _evaluate(name + "+pos", posnorm(g(r_ho), g(r_te)), test, cfg, rows)
    full_tr = agg(raw_tr)
    _evaluate("padim-agg", Padim(100).fit((full_tr - mu) / sd).predict(te), test, cfg, rows)
    _evaluate("padim-raw", Padim(100).fit(raw_tr).predict(raw_te), test, cfg, rows)
    out = {"args": {k: str(v) for k, v in vars(args).items() if k != "func"},
           "residual_var": {"train": float(r_tr.pow(2).mean()), "holdout": float(r_ho.pow(2).mean())},
           "rows": rows, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _run_features(args, raw_layers: bool = False, transform=None):
    """A trained run's model, the test set, and per split ("te" test, "po" the run's held-out
    images, which set the position statistics, "tr" its training images) the Block C residuals [N, C, g, g]
    (float16) and, with ``raw_layers``, the trunk's layer outputs at their own strides.
    ``transform`` (model input [3, H, W] in [0, 1] -> the same) is applied to every image first."""
    import torch

    from haloae.train.checkpoint import load_checkpoint
    from haloae.train.data import find_mvtec_samples, find_train_samples, split_holdout
    from haloae.train.evaluate import _load
    from tqdm import tqdm

    model, ckpt = load_checkpoint(args.run / "final.pt")
    model.eval()
    bb, hw = model.backbone, model.cfg.hw
    tcfg = ckpt["train"]["config"]
    samples, _ = find_train_samples(args.data)
    train_s, pos_s = split_holdout(samples, tcfg["holdout_fraction"], tcfg["seed"])
    test_s = find_mvtec_samples(args.data, "test")
    loaded = [_load(s, hw) for s in test_s]
    test = {"labels": [s.label for s in test_s], "classes": [s.defect_class for s in test_s],
            "masks": np.stack([m for _, m, _ in loaded])}

    def run(xs, desc):
        res, raw = [], []
        for i in tqdm(range(0, len(xs), 16), desc=desc, unit="batch", leave=False):
            batch = xs[i:i + 16] if transform is None else [transform(x) for x in xs[i:i + 16]]
            x = torch.from_numpy(np.stack(batch).astype(np.float32))
            with torch.no_grad():
                layers = bb.layers(x)
                f = bb.aggregate(bb.stack(layers))
                res.append((f - model.autoencoder(f)).half())
                if raw_layers:
                    raw.append([t.half() for t in layers])
        return torch.cat(res), [torch.cat(t) for t in zip(*raw)]

    splits = {"te": run([x for x, _, _ in loaded], "test"),
              "po": run([_load(s, hw)[0] for s in pos_s], "held-out images"),
              "tr": run([_load(s, hw)[0] for s in train_s], "training images")}
    return model, test, splits


def _fit_apply(train, apply_to, rank, eps, grid_hw, share=1, dims=0, coarse=0):
    """Fit a `PositionGaussian` (``dims`` channels, 0 = all, ``rank`` least-variance directions,
    0 = all, one covariance per ``share`` x ``share`` cell, ``coarse`` cells per side for the
    cells' Gaussian of ``map.coarse_weight``) on ``train`` [N, C, gh, gw]; return its error maps
    of every tensor in ``apply_to``."""
    import torch

    from haloae.train.position_gaussian import PositionGaussian

    g = PositionGaussian(train.shape[1], grid_hw, dims, rank, eps=eps, share=share, coarse=coarse)
    g.fit([train[i:i + 64].float() for i in range(0, len(train), 64)])
    with torch.no_grad():
        return [torch.cat([g(x[i:i + 32].float()) for i in range(0, len(x), 32)])
                for x in apply_to]


def _posnorm(e_te, e_po, sigma, hw):
    """Smooth (sigma in input pixels), then normalise per position with the statistics of
    ``e_po`` (the held-out images), through the model's own `Calibration` module."""
    from haloae.train.anomaly_map import gaussian_blur_grid
    from haloae.train.calibration import Calibration

    def blur(e):
        return gaussian_blur_grid(e, sigma * e.shape[-2] / hw[0]) if sigma > 0 else e

    s_te, s_po = blur(e_te), blur(e_po)
    cal = Calibration(tuple(s_po.shape[-2:]))
    cal.set_position_stats(s_po.mean(0)[0], s_po.std(0)[0])
    return cal.position_normalize(s_te)


def checkpoint(args) -> int:
    import torch

    from haloae.train.anomaly_map import upsample

    torch.set_num_threads(args.threads)
    model, test, sp = _run_features(args)
    cfg, hw = model.cfg, model.cfg.hw
    rows: list[dict] = []
    for spec in args.gaussians.split(","):
        parts = spec.split(":")
        rank, eps = int(parts[0]), float(parts[1])
        share = int(parts[2]) if len(parts) > 2 else 1
        e_te, e_po = _fit_apply(sp["tr"][0], [sp["te"][0], sp["po"][0]], rank, eps,
                                cfg.backbone.grid_hw, share)
        cell = f"-share{share}" if share > 1 else ""
        for sigma in [float(v) for v in args.sigmas.split(",")]:
            z = _posnorm(e_te, e_po, sigma, hw)
            _row(f"gauss-k{rank}-eps{eps:g}{cell}+pos sigma {sigma:g}", upsample(z, hw)[:, 0].numpy(),
                 test, rows)
    return _write(args, rows)


def maps(args) -> int:
    """Map forms around the shipped one, each fused with it as (z + w * z_term) / (1 + w) of
    position-normalised maps: the complementary (high-variance) Gaussian directions, a coarse
    residual Gaussian (residuals average-pooled), a fine PaDiM term on the stride-4 trunk layer,
    PaDiM on the raw multi-scale features, and the shipped map minus a share of its own image
    background (the 25th percentile)."""
    import torch
    import torch.nn.functional as F

    from haloae.train.anomaly_map import upsample

    torch.set_num_threads(args.threads)
    model, test, sp = _run_features(args, raw_layers=True)
    cfg, hw, grid = model.cfg, model.cfg.hw, model.cfg.backbone.grid_hw
    m, sigma, rows = cfg.map, cfg.map.sigma, []
    ws = [float(v) for v in args.weights.split(",")]

    def emit(name, z):
        _row(name, upsample(z, hw)[:, 0].numpy(), test, rows)

    def fused(name, z_term):
        zt = F.interpolate(z_term, size=z.shape[-2:], mode="bilinear", align_corners=False) \
            if z_term.shape[-2:] != z.shape[-2:] else z_term
        for w in ws:
            emit(f"shipped + {w:g} {name}", (z + w * zt) / (1 + w))

    r_tr, r_te, r_po = sp["tr"][0], sp["te"][0], sp["po"][0]
    lo_te, lo_po = _fit_apply(r_tr, [r_te, r_po], m.gaussian_rank, m.gaussian_eps, grid)
    z = _posnorm(lo_te, lo_po, sigma, hw)
    emit(f"shipped (k{m.gaussian_rank}, eps {m.gaussian_eps:g}, +pos)", z)
    # the other directions: RMS over all C = mean of the two parts' squares, weighted by count
    c = r_tr.shape[1]
    k = min(m.gaussian_rank or c, c)
    if k < c:  # a full Gaussian (rank 0) has no other directions
        al_te, al_po = _fit_apply(r_tr, [r_te, r_po], 0, m.gaussian_eps, grid)
        hi = [((c * a ** 2 - k * lo ** 2).clamp_min(0) / (c - k)).sqrt()
              for a, lo in ((al_te, lo_te), (al_po, lo_po))]
        fused(f"high-variance directions ({c - k})", _posnorm(*hi, sigma, hw))
    fine = model.backbone.finer_channels  # map.fine_weight's z_fine
    if 0 < fine < c:
        e = _fit_apply(r_tr[:, :fine], [r_te[:, :fine], r_po[:, :fine]], 0, m.gaussian_eps, grid)
        z_fine = _posnorm(*e, sigma, hw)
        fused(f"finer layers' own Gaussian ({fine} channels)", z_fine)
        # map.coarse_weight: the cells' mean residual under its own Gaussian, upsampled to the
        # grid, then smoothed and position-normalised there (the model's order)
        for cells in (2, 4):
            e = _fit_apply(r_tr, [r_te, r_po], 0, m.gaussian_eps, grid, coarse=cells)
            z_coarse = _posnorm(*[x[:, -1:] for x in e], sigma, hw)
            for f in (0.5, 1.0):
                for w in ws:
                    emit(f"z + {f:g} z_fine + {w:g} z_coarse ({cells}x{cells} cells)",
                         (z + f * z_fine + w * z_coarse) / (1 + f + w))
    for pool in (2, 4):
        p = [F.avg_pool2d(r.float(), pool) for r in (r_tr, r_te, r_po)]
        e = _fit_apply(p[0], p[1:], k, m.gaussian_eps, (grid[0] // pool, grid[1] // pool))
        fused(f"coarse residual Gaussian (pool {pool})", _posnorm(*e, sigma, hw))

    def fine(split):
        f = sp[split][1][0].float()  # the stride-4 layer: PaDiM on its 3x3 average
        return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)

    f_tr = fine("tr")
    e = _fit_apply(f_tr, [fine("te"), fine("po")], 0, 0.01, tuple(f_tr.shape[-2:]))
    zf = _posnorm(*e, sigma, hw)
    zu = F.interpolate(z, size=zf.shape[-2:], mode="bilinear", align_corners=False)
    for w in ws:
        emit(f"shipped + {w:g} fine stride-4 PaDiM", (zu + w * zf) / (1 + w))
    # PaDiM on the raw (unaggregated) multi-scale trunk features: a second, sharper error source
    from peers import Padim

    def raw(split):
        return model.backbone.stack([t.float() for t in sp[split][1]])

    r = {s_: raw(s_) for s_ in ("tr", "te", "po")}
    mu, sd = r["tr"].mean((0, 2, 3), keepdim=True), r["tr"].std((0, 2, 3), keepdim=True)
    padim = Padim(dims=100, seed=0).fit((r["tr"] - mu) / sd)
    fused("PaDiM on raw features", _posnorm(*[padim.predict((r[s_] - mu) / sd) for s_ in ("te", "po")],
                                             sigma, hw))
    background = z.flatten(1).quantile(0.25, dim=1)[:, None, None, None]
    for lam in (0.5, 1.0):
        emit(f"shipped - {lam:g} x image background (q0.25)", z - lam * background)
    return _write(args, rows)


def few(args) -> int:
    """The Gaussian (and PaDiM for reference) estimated from few good images; see the module doc."""
    import torch

    from haloae.train.anomaly_map import smooth, upsample
    from peers import Padim

    torch.set_num_threads(args.threads)
    model, test, sp = _run_features(args, raw_layers=True)
    cfg, hw, grid = model.cfg, model.cfg.hw, model.cfg.backbone.grid_hw
    m, rows = cfg.map, []
    gen = torch.Generator().manual_seed(args.seed)
    order = {k: torch.randperm(len(sp[k][0]), generator=gen) for k in ("tr", "po")}

    def raw(split, idx=None):
        layers = sp[split][1] if idx is None else [t[idx] for t in sp[split][1]]
        return model.backbone.stack([t.float() for t in layers])

    raw_te = raw("te")
    for n in [int(v) for v in args.images.split(",")]:
        tr = order["tr"][:min(n, len(order["tr"]))]
        po = order["po"][:max(2, min(round(n * args.holdout / (1 - args.holdout)), len(order["po"])))]
        for d in [int(v) for v in args.dims.split(",")]:
            e_te, e_po = _fit_apply(sp["tr"][0][tr], [sp["te"][0], sp["po"][0][po]], 0,
                                    m.gaussian_eps, grid, dims=d)
            z = _posnorm(e_te, e_po, m.sigma, hw)
            _row(f"N {len(tr)} + {len(po)}: gauss d{d or sp['tr'][0].shape[1]}",
                 upsample(z, hw)[:, 0].numpy(), test, rows)
        if args.pool:  # the Gaussian on all 4N/3, position statistics from out-of-fold maps
            every = torch.cat([sp["tr"][0][tr], sp["po"][0][po]])
            (e_te,) = _fit_apply(every, [sp["te"][0]], 0, m.gaussian_eps, grid)
            folds = torch.randperm(len(every), generator=gen).chunk(5)
            oof = torch.zeros(len(every), 1, *grid)
            for f in folds:
                rest = torch.cat([g for g in folds if g is not f])
                (oof[f],) = _fit_apply(every[rest], [every[f]], 0, m.gaussian_eps, grid)
            z = _posnorm(e_te, oof, m.sigma, hw)
            _row(f"N {len(tr)} + {len(po)}: gauss d{sp['tr'][0].shape[1]} on all {len(every)}, "
                 "position statistics out of 5 folds", upsample(z, hw)[:, 0].numpy(), test, rows)
        padim = Padim(dims=100, seed=0).fit(torch.cat([raw("tr", tr), raw("po", po)]))
        _row(f"N {len(tr)} + {len(po)}: PaDiM d100 on all {len(tr) + len(po)}",
             upsample(smooth(padim.predict(raw_te), m, hw), hw)[:, 0].numpy(), test, rows)
    return _write(args, rows)


# per-image input normalisations of the `inputs` subcommand (lever row 27), on model inputs
# [3, H, W] in [0, 1]; targets: MTD's median training image (mean 107, std 29 grey levels)
_MEAN, _STD = 107 / 255, 29 / 255
INPUT_FORMS = {
    "none": lambda x: x,
    "gain": lambda x: np.clip(x * (_MEAN / max(float(x.mean()), 1e-3)), 0, 1),
    "standard": lambda x: np.clip((x - x.mean()) / max(float(x.std()), 1e-3) * _STD + _MEAN, 0, 1),
    "flat": lambda x: np.clip(x / (_blur(x.mean(0), 32) + 1e-3)[None] * _MEAN, 0, 1),
    "gamma": lambda x: np.clip(x, 1e-4, 1) ** (np.log(_MEAN) / np.log(max(float(x.mean()), 1e-3))),
}


def _blur(grey, sigma):
    import cv2

    return cv2.GaussianBlur(grey, (0, 0), sigma)


def inputs(args) -> int:
    """Each input form applied to every image before a trained run's model (its Block C as
    trained), the shipped Gaussian and position statistics refitted on the transformed images."""
    import torch

    from haloae.train.anomaly_map import upsample

    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for name in args.forms.split(","):
        if name not in INPUT_FORMS:
            raise SystemExit(f"unknown input form {name!r}: choose from {', '.join(INPUT_FORMS)}")
        model, test, sp = _run_features(args, transform=INPUT_FORMS[name])
        m, hw = model.cfg.map, model.cfg.hw
        e_te, e_po = _fit_apply(sp["tr"][0], [sp["te"][0], sp["po"][0]], m.gaussian_rank,
                                m.gaussian_eps, model.cfg.backbone.grid_hw)
        _row(f"input {name}", upsample(_posnorm(e_te, e_po, m.sigma, hw), hw)[:, 0].numpy(),
             test, rows)
    return _write(args, rows)


def _score_row(name, scores, test, rows, fprs=(0.028, 0.05)):
    """One image-score form (the map unchanged): image AUROC, F1-max, per-class AUROC and the
    best recall at each false-positive rate of ``fprs`` on the good test images (the
    threshold just above the good score that many good images exceed, as `accuracy._metrics`)."""
    from accuracy import threshold_at_fpr

    from haloae.train import metrics

    y, classes = np.asarray(test["labels"]), np.array(test["classes"])
    r = {"form": name, "image_auroc": metrics.auroc(y, scores), "image_f1_max": metrics.f1_max(y, scores)[0]}
    for c in sorted(set(test["classes"]) - {"good"}):
        sel = (classes == "good") | (classes == c)
        r[c] = metrics.auroc(y[sel], scores[sel])
    for fpr in fprs:
        r[f"recall_at_fpr_{fpr:g}"] = float((scores[y == 1] > threshold_at_fpr(scores, y, fpr)).mean())
    rows.append(r)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else str(v) for k, v in r.items()), flush=True)


def scores(args) -> int:
    """Image-score forms on a trained run's map (its Block C; Gaussian and position statistics
    refitted on its split as `checkpoint` does): the max, top-k means, the max of a k x k
    average-pooled map, and max + f w mean with w = std(maxima) / std(means) of the held-out
    maps, each held-out map under the position statistics of the other held-out images
    (5 folds, as `train/calibrate.py` does; its `score_mean_weight`)."""
    import torch
    import torch.nn.functional as F

    from haloae.train.anomaly_map import upsample
    from haloae.train.calibrate import cross_folds, score_mean_weight

    torch.set_num_threads(args.threads)
    model, test, sp = _run_features(args)
    m, hw = model.cfg.map, model.cfg.hw
    e_te, e_po = _fit_apply(sp["tr"][0], [sp["te"][0], sp["po"][0]], m.gaussian_rank, m.gaussian_eps,
                            model.cfg.backbone.grid_hw)
    z_te = upsample(_posnorm(e_te, e_po, m.sigma, hw), hw)
    n = e_po.shape[0]
    held = torch.empty(n, *hw)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    for fold, rest in cross_folds(order, min(5, n)):
        held[fold] = upsample(_posnorm(e_po[fold], e_po[rest], m.sigma, hw), hw)[:, 0]
    flat, flat_po = z_te.flatten(1), held.flatten(1)
    mx, mean = flat.max(1).values.numpy(), flat.mean(1).numpy()
    w = score_mean_weight(flat_po.max(1).values.numpy(), flat_po.mean(1).numpy(), 1.0)
    print(f"w = std(maxima) / std(means) of {n} held-out maps = {w:.4g}", flush=True)
    rows: list[dict] = []
    _score_row("max", mx, test, rows)
    for k in [int(v) for v in args.topk.split(",") if v]:
        _score_row(f"top{k} mean", flat.topk(k, 1).values.mean(1).numpy(), test, rows)
    for p in [int(v) for v in args.pools.split(",") if v]:
        _score_row(f"max of the {p}x{p} mean-pooled map", F.avg_pool2d(z_te, p, 1).flatten(1).max(1).values.numpy(),
                   test, rows)
    for f in [float(v) for v in args.factors.split(",") if v]:
        _score_row(f"max + {f:g} w mean (w {w:.3g})", mx + f * w * mean, test, rows)
    _score_row("mean", mean, test, rows)
    return _write(args, rows)


def _write(args, rows) -> int:
    out = {"args": {k: str(v) for k, v in vars(args).items() if k != "func"}, "rows": rows,
           "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="cache trunk features of an MVTec-layout set")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--model", default="edge", help="model config (its backbone and input size)")
    c.add_argument("--threads", type=int, default=2)
    c.set_defaults(func=cache)
    s = sub.add_parser("study", help="train Block C on the cache and score every map form")
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--levels", type=int, default=4)
    s.add_argument("--dim", type=int, default=96)
    s.add_argument("--bottleneck", type=int, default=96)
    s.add_argument("--noise", type=float, default=0.0, help="Gaussian input noise (std units)")
    s.add_argument("--drop", type=float, default=0.0, help="input dropout")
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--aggregate", type=int, default=None,
                   help="local average window of the features (default: the model config's)")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--holdout", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=study)
    def run_parser(name, help_, func):  # the subcommands that re-score a trained run
        r = sub.add_parser(name, help=help_)
        r.add_argument("--run", type=Path, required=True, help="training run folder (final.pt inside)")
        r.add_argument("--data", type=Path, required=True)
        r.add_argument("--threads", type=int, default=2)
        r.add_argument("--out", type=Path, required=True)
        r.set_defaults(func=func)
        return r

    k = run_parser("checkpoint", "re-score a trained run with other Gaussian ranks / sigmas", checkpoint)
    k.add_argument("--gaussians", default="64:0.01,176:0.01",
                   help="comma list of rank:eps[:share] (share: one covariance per s x s cell)")
    k.add_argument("--sigmas", default="4", help="comma list of smoothing sigmas (input pixels)")
    f = run_parser("maps", "a trained run's map fused with other terms (per-class AUPRO)", maps)
    f.add_argument("--weights", default="0.25,0.5,1", help="comma list of fusion weights w")
    i = run_parser("inputs", "a trained run re-scored with per-image input normalisations", inputs)
    i.add_argument("--forms", default="none,gain,standard,flat,gamma",
                   help=f"comma list of: {', '.join(INPUT_FORMS)}")
    w = run_parser("few", "the Gaussian and PaDiM estimated from few good images", few)
    w.add_argument("--images", default="60,100,200", help="comma list of training-image counts N")
    w.add_argument("--dims", default="0,100", help="comma list of Gaussian channel counts (0 = all)")
    w.add_argument("--holdout", type=float, default=0.25,
                   help="held-out share of the good images: N / (1 - h) * h set the position statistics")
    w.add_argument("--seed", type=int, default=0, help="which images are drawn")
    w.add_argument("--pool", action="store_true",
                   help="also: the Gaussian on all 4N/3 images, position statistics from 5-fold "
                        "out-of-fold maps")
    sc = run_parser("scores", "image-score forms (max, top-k, pooled, max + w mean) on a run's map", scores)
    sc.add_argument("--topk", default="100,1000,16000", help="comma list of top-k pixel counts")
    sc.add_argument("--pools", default="16,32,64", help="comma list of average-pooling windows (pixels)")
    sc.add_argument("--factors", default="0.25,0.5,1,2,4", help="comma list of factors f of the mean weight w")
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

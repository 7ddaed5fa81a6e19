"""``haloae-export``: turn a trained checkpoint into a bundle (ONNX fp32 [+ fp16], manifest), verify
a bundle, or build its TensorRT engine on the target.

Exit codes: 0 done (also when ``--engine`` could not run because TensorRT / a GPU is missing:
a warning says where to build it, the ONNX bundle is complete); 1 the export failed (graph not
TensorRT-ready, parity above tolerance, engine build error); 2 bad input (missing or invalid
checkpoint, bundle or data, bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from haloae import cli
from haloae.errors import UserError
from haloae import bundle as bundle_mod
from haloae.runtime import trt_engine
from haloae.manifest import Manifest

EXAMPLES = """\
examples:
  # checkpoint -> bundle with fp32 and fp16 ONNX graphs, parity on 8 synthetic images
  haloae-export runs/tiny/final.pt --out bundles/tiny --fp16

  # parity on images of your data set, batch size 4 in the graph
  haloae-export runs/mtd/final.pt --out bundles/mtd --fp16 --data ../shared/data/mtd --batch 4

  # check a bundle (hashes, manifest version, graph input/output names and shapes)
  haloae-export --verify bundles/mtd

  # on the Jetson: build (or reuse) the TensorRT engine of a copied bundle
  haloae-export --engine bundles/mtd --fp16

Engines are specific to the GPU and TensorRT version: build them on the target (or let
haloae-edge build one at first start); they are cached in $HALOAE_ENGINE_CACHE or
~/.cache/haloae/engines, never shipped in the bundle. See docs/bundle.md.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="haloae-export", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", type=Path,
                   help="checkpoint (final.pt) to export; with --engine alone: a bundle folder")
    p.add_argument("--out", type=Path, help="bundle folder to write (replaced if it is a bundle)")
    p.add_argument("--verify", type=Path, metavar="BUNDLE_DIR", help="verify a bundle and exit")
    p.add_argument("--fp16", action="store_true",
                   help="also write model.fp16.onnx; --engine then builds an fp16 engine")
    p.add_argument("--engine", action="store_true",
                   help="build/reuse the TensorRT engine (needs tensorrt and a GPU)")
    p.add_argument("--engine-cache", type=Path, metavar="DIR",
                   help="engine cache folder (default $HALOAE_ENGINE_CACHE or "
                        "~/.cache/haloae/engines)")
    p.add_argument("--batch", type=int, default=1, help="static batch size of the graph (1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..17 (17)")
    p.add_argument("--data", type=Path,
                   help="images for the parity check (MVTec root or image folder); default "
                        "synthetic parts")
    p.add_argument("--samples", type=int, default=8, help="parity images K (8)")
    p.add_argument("--threads", type=int, help="CPU threads for torch / ONNX Runtime (all)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return cli.add_version(p)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import haloae

    return {"haloae": haloae.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _model_section(cfg, ckpt: dict[str, Any], model_sha: str, ckpt_path: Path) -> dict[str, Any]:
    train = ckpt.get("train") or {}
    return {
        "id": f"{cfg.name}-{model_sha[:12]}", "name": cfg.name, "config": cfg.to_dict(),
        "training": {k: train.get(k) for k in ("data", "epochs", "seed", "time_s", "created")},
        "checkpoint": {"file": ckpt_path.name, "sha256": bundle_mod.sha256_file(ckpt_path)},
        "versions": _versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _threshold_section(calibration: dict[str, Any], model) -> dict[str, Any]:
    """The manifest's threshold block: raw values from the model's calibration buffers (what
    the graph divides by), how they were set from the checkpoint's calibration record."""
    keys = ("method", "quantile", "pixel_quantile", "promised_false_positive_rate",
            "threshold_images", "held_out_images", "out_of_fold_images", "images_needed",
            "reliable", "normal_scores",
            "score_mean_weight")  # map.score max_mean: the edge rescores with it under ignore zones
    return {**model.calibration.thresholds(), **{k: calibration[k] for k in keys if k in calibration}}


def export_bundle(checkpoint: Path, out: Path, fp16: bool = False, batch: int = 1,
                  opset: int = 17, data: Path | None = None, samples: int = 8,
                  threads: int | None = None,
                  say: Callable[[str], None] = lambda m: None) -> Manifest:
    """Export ``checkpoint`` to the bundle folder ``out`` and return its manifest.

    Built in a temporary folder beside ``out`` and moved in place at the end, so a failed
    export never leaves a half-written bundle. ``out`` may be missing, empty or a bundle.
    """
    import dataclasses

    import torch

    from haloae.bundle import Bundle
    from haloae.export import parity
    from haloae.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, export_onnx
    from haloae.train.checkpoint import CheckpointError, load_checkpoint
    from haloae.train.inference import HaloAEInference

    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / bundle_mod.MANIFEST).is_file())):
        raise bundle_mod.BundleError(f"{out} exists and is not a bundle: choose an empty or new "
                                     "--out")
    if batch < 1 or samples < 1:
        raise UserError("--batch and --samples must be >= 1")
    if not 13 <= opset <= 17:
        raise UserError(f"--opset {opset}: use 13..17 (TensorRT 8.5/8.6 parse opset <= 17)")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    say(f"[1/5] loading {checkpoint}")
    model, ckpt = load_checkpoint(checkpoint)
    if not ckpt.get("calibration"):
        raise CheckpointError(f"{checkpoint} has no calibration: export the final.pt of a "
                              "finished haloae-train run")
    module = HaloAEInference(model, source=str(checkpoint))
    h, w = model.cfg.hw
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the bundle is for other users too
    try:
        say(f"[2/5] exporting ONNX (opset {opset}, input [{batch}, 3, {h}, {w}])")
        graph = export_onnx(module, (batch, 3, h, w), work / bundle_mod.MODEL_FP32, opset)
        say(f"      {len(graph.graph.node)} nodes, TensorRT operator check passed")
        say(f"[3/5] parity PyTorch vs ONNX Runtime on {samples} images")
        x, source = parity.sample_images(samples, (h, w), data)
        ref = parity.torch_runner(module, batch)(x)
        files = {bundle_mod.MODEL_FP32: bundle_mod.file_entry(work / bundle_mod.MODEL_FP32,
                                                              "fp32")}
        manifest = Manifest.create(
            input_name=INPUT_NAME, input_shape=[batch, 3, h, w],
            mean=model.backbone.mean.reshape(-1).tolist(), std=model.backbone.std.reshape(-1).tolist(),
            output_names=OUTPUT_NAMES, threshold=_threshold_section(ckpt["calibration"], model),
            files=files, parity={},
            model=_model_section(model.cfg, ckpt, files[bundle_mod.MODEL_FP32]["sha256"],
                                 Path(checkpoint)))
        # the graphs run through the same runtime backend as the edge (haloae.runtime)
        got32 = parity.run_bundle(Bundle(work, manifest), "fp32", x, threads)
        record = {"samples": len(x), "source": source, "fp32": parity.check_fp32(ref, got32)}
        say(f"      fp32 max |Δscore| {record['fp32']['max_abs_score']:.2g}, "
            f"max |Δmap| {record['fp32']['max_abs_map']:.2g}")
        if fp16:
            say("[4/5] fp16 graph (fp32 I/O, fp32 islands) and its parity vs fp32")
            _write_fp16(graph, work / bundle_mod.MODEL_FP16)
            files[bundle_mod.MODEL_FP16] = bundle_mod.file_entry(work / bundle_mod.MODEL_FP16,
                                                                 "fp16")
            manifest = Manifest.from_dict({**manifest.to_dict(), "files": files})
            got16 = parity.run_bundle(Bundle(work, manifest), "fp16", x, threads)
            record["fp16"] = parity.check_fp16(got32, got16)
            say(f"      fp16 max |Δscore| {record['fp16']['max_abs_score']:.2g}, "
                f"max |Δmap| {record['fp16']['max_abs_map']:.2g}")
        else:
            say("[4/5] fp16 skipped (use --fp16)")
        say("[5/5] writing manifest")
        manifest = dataclasses.replace(manifest, parity=record)
        manifest.write(work)
        manifest = bundle_mod.verify_bundle(work, check_onnx=True)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _write_fp16(graph, path: Path) -> None:
    import onnx

    from haloae.export import trt_ops
    from haloae.export.fp16 import convert_fp16

    model16 = convert_fp16(graph)
    trt_ops.assert_trt_compatible(model16)
    onnx.save(model16, str(path))


def _engine(bundle_dir: Path, precision: str, cache: Path | None) -> None:
    try:
        path = trt_engine.get_or_build_engine(bundle_dir, cache, precision)
    except trt_engine.TensorRTUnavailable as exc:
        print(f"haloae-export: warning: engine not built: {exc}", file=sys.stderr)
        return
    print(f"TensorRT {precision} engine: {path}")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.verify is not None:
        check_onnx = importlib.util.find_spec("onnx") is not None
        manifest = bundle_mod.verify_bundle(args.verify, check_onnx=check_onnx)
        note = "" if check_onnx else " (graph check skipped: the onnx package is not installed)"
        print(f"bundle {args.verify} OK: model {manifest.model.get('id')}, files "
              f"{', '.join(manifest.files)}, input {list(manifest.input.shape)}{note}")
        return 0
    precision = "fp16" if args.fp16 else "fp32"
    if args.engine and args.out is None and args.source is not None:
        _engine(args.source, precision, args.engine_cache)
        return 0
    if args.source is None or args.out is None:
        parser.error("give CHECKPOINT --out BUNDLE_DIR, --verify BUNDLE_DIR or --engine "
                     "BUNDLE_DIR")
    start = time.perf_counter()
    manifest = export_bundle(args.source, args.out, args.fp16, args.batch, args.opset, args.data,
                             args.samples, args.threads, say=print)
    print(f"bundle {args.out} written in {time.perf_counter() - start:.1f} s "
          f"(model {manifest.model['id']})")
    if args.engine:
        _engine(args.out, precision, args.engine_cache)
    return 0


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return _run(args, parser)


def main(argv: list[str] | None = None) -> int:
    return cli.run("haloae-export", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

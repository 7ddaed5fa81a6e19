"""Model latency per frame: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime fp16, and PaDiM.

For a trained checkpoint (or a model config with untrained weights and statistics fitted on
random images: latency does not depend on the values) it exports bundles at batch 1 and at
``--batch``, then times each runtime after a warm-up: median and p99 ms per *frame*, the
model's FLOPs, the achieved GFLOP/s, and the machine's measured fp32 matmul GFLOP/s for scale.
In the same run it times the PaDiM peer (bench/peers.py: the same backbone in PyTorch eager,
100 channels, per-position Mahalanobis), the way the accuracy benchmark runs it, and writes
HaloAE ONNX Runtime fp32 / PaDiM as a ratio. At batch 1 it also times the trunk alone (Block
A exported by itself, ONNX Runtime fp32): the floor any head on these features pays, so the
head's own cost (Block C + anomaly map) is the difference. Writes JSON.

    python bench/latency.py --checkpoint runs/mtd-edge/final.pt --threads 2 --out bench/results/latency.json
    python bench/latency.py --config edge --threads 2          # untrained weights, same graph
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def timeit(fn, x, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    n = x.shape[0]
    per_frame = np.array(times) / n
    return {"batch": n, "iters": iters, "median_ms": float(np.median(per_frame)),
            "p99_ms": float(np.percentile(per_frame, 99)), "fps": float(1000.0 / np.median(per_frame))}


def matmul_gflops(threads: int, n: int = 1024, iters: int = 20) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e9


def model_flops(module, hw: tuple[int, int]) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.rand(1, 3, *hw))
    return float(counter.get_total_flops())


def load_module(args):
    from haloae.train.checkpoint import load_checkpoint, save_checkpoint
    from haloae.train.config import load_model_config
    from haloae.train.inference import HaloAEInference
    from haloae.train.torch_model import create_model

    from haloae.train.fit_stats import fit_for_timing

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        return HaloAEInference(model), Path(args.checkpoint)
    model = create_model(load_model_config(args.config)).eval()
    calib = fit_for_timing(model)
    tmp = Path(tempfile.mkdtemp()) / "untrained.pt"
    save_checkpoint(tmp, model, calib, {"note": "untrained, for latency only"})
    return HaloAEInference(model), tmp


def padim_fn(ckpt: str, batch: int):
    """PaDiM as bench/accuracy.py runs it: Block A's trunk (PyTorch) + per-position Gaussian."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import Padim

    from haloae.train.anomaly_map import smooth, upsample
    from haloae.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    bb, cfg = model.backbone, model.cfg
    with torch.inference_mode():
        feats = bb.multiscale(torch.rand(8, 3, *cfg.hw))
    padim = Padim(dims=100).fit(feats.repeat(16, 1, 1, 1) + torch.randn(128, *feats.shape[1:]))

    def fn(a):
        with torch.inference_mode():
            grid = padim.predict(bb.multiscale(torch.from_numpy(a)))
            amap = upsample(smooth(grid, cfg.map, cfg.hw), cfg.hw)
            return amap.flatten(1).max(dim=1).values, amap
    return fn


def ort_fn(bundle: Path, precision: str, threads: int):
    """The bundle's graph through the runtime's ONNX Runtime backend (what the edge runs)."""
    from haloae.runtime import load_backend

    return load_backend(bundle, "onnxruntime", precision=precision, threads=threads, device="cpu").run


def export_trunk(ckpt: Path, path: Path, hw: tuple[int, int]) -> Path:
    """Block A alone (the frozen trunk, its resize, aggregation and standardisation) as ONNX:
    the floor every head on these features pays, HaloAE and PaDiM alike."""
    import torch

    from haloae.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    torch.onnx.export(model.backbone.eval(), (torch.rand(1, 3, *hw),), str(path), opset_version=17,
                      dynamo=True, verbose=False)
    return path


def trunk_fn(path: Path, threads: int):
    import onnxruntime as ort

    from haloae.runtime.backends.onnxruntime_backend import session_options

    sess = ort.InferenceSession(str(path), session_options(ort, threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})


def time_runtime(name: str, ckpt: str, bundle: str, batch: int, threads: int, warmup: int, iters: int,
                 hw: tuple[int, int]) -> dict:
    """Time one runtime (runs in its own process)."""
    x = np.random.default_rng(0).random((batch, 3, *hw), dtype=np.float32)
    if name == "padim-torch-eager":
        import torch

        torch.set_num_threads(threads)
        fn = padim_fn(ckpt, batch)
    elif name == "torch-eager":
        import torch

        from haloae.train.checkpoint import load_checkpoint
        from haloae.train.inference import HaloAEInference

        torch.set_num_threads(threads)
        model, _ = load_checkpoint(ckpt)
        module = HaloAEInference(model).eval()

        def fn(a):
            with torch.inference_mode():
                return module(torch.from_numpy(a))
    elif name == "trunk-onnxruntime-fp32":
        fn = trunk_fn(Path(bundle) / "trunk.onnx", threads)
    else:
        fn = ort_fn(Path(bundle), "fp32" if name.endswith("fp32") else "fp16", threads)
    return timeit(fn, x, warmup, iters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a trained final.pt")
    src.add_argument("--config", help="a model config name or path (untrained weights)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch to compare with batch 1")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency.json"))
    args = parser.parse_args(argv)

    import torch

    from haloae.export.cli import export_bundle

    torch.set_num_threads(args.threads)
    module, ckpt_path = load_module(args)
    module.eval()
    hw = module.cfg.hw
    flops = model_flops(module, hw)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": args.threads, "torch": torch.__version__,
                           "matmul_gflops": round(matmul_gflops(args.threads), 1)},
               "model": {"input": list(hw), "gflops_per_frame": round(flops / 1e9, 3),
                         "checkpoint": str(ckpt_path)},
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    print(f"model: {flops / 1e9:.2f} GFLOP/frame; machine matmul {results['machine']['matmul_gflops']} GFLOP/s "
          f"({args.threads} threads)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="haloae-latency-"))
    ctx = multiprocessing.get_context("spawn")
    for batch in sorted({1, args.batch}):
        bundle = work / f"b{batch}"
        export_bundle(ckpt_path, bundle, fp16=True, batch=batch, samples=batch, threads=args.threads)
        names = ["torch-eager", "onnxruntime-fp32", "onnxruntime-fp16", "padim-torch-eager"]
        if batch == 1:
            export_trunk(ckpt_path, bundle / "trunk.onnx", hw)
            names.append("trunk-onnxruntime-fp32")
        for name in names:
            # each runtime in a fresh process: torch's OpenMP threads keep spinning after a
            # forward and slowed ONNX Runtime in the same process by ~1.8x on 2 cores
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(time_runtime, name, str(ckpt_path), str(bundle), batch, args.threads,
                                args.warmup, args.iters, hw).result()
            r["runtime"] = name
            r["gflops_achieved"] = None if name.startswith(("padim", "trunk")) else round(flops / 1e9 * r["fps"], 2)
            results["runs"].append(r)
            print(f"{name:18s} batch {batch}: median {r['median_ms']:.2f} ms/frame, p99 {r['p99_ms']:.2f}, "
                  f"{r['gflops_achieved']} GFLOP/s", flush=True)
    for batch in sorted({1, args.batch}):
        ms = {r["runtime"]: r["median_ms"] for r in results["runs"] if r["batch"] == batch}
        ratio = ms["onnxruntime-fp32"] / ms["padim-torch-eager"]
        results[f"haloae_ort_fp32_over_padim_batch{batch}"] = round(ratio, 3)
        print(f"batch {batch}: HaloAE ONNX Runtime fp32 / PaDiM = {ratio:.3f}", flush=True)
        if "trunk-onnxruntime-fp32" in ms:
            head = ms["onnxruntime-fp32"] - ms["trunk-onnxruntime-fp32"]
            results[f"head_ms_batch{batch}"] = round(head, 2)
            print(f"batch {batch}: trunk alone {ms['trunk-onnxruntime-fp32']:.2f} ms, HaloAE head "
                  f"(Block C + map) {head:.2f} ms", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

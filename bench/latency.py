"""Model latency per frame: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime fp16, and PaDiM.

For a trained checkpoint (or a model config with untrained weights and statistics fitted on
random images: latency does not depend on the values) it exports bundles at batch 1 and at
``--batch``, then times each runtime after a warm-up, every runtime in its own warm process and
all of them taking turns in ``--rounds`` interleaved rounds (this VM's speed drifts by a third
within minutes; interleaving keeps the ratios honest): median and p99 ms per *frame*, the
model's FLOPs, the achieved GFLOP/s, and the machine's measured fp32 matmul GFLOP/s for scale.
In the same run it times the PaDiM peer (bench/peers.py: the same backbone in PyTorch eager,
100 channels, per-position Mahalanobis), the way the accuracy benchmark runs it, and writes
HaloAE ONNX Runtime fp32 / PaDiM as a ratio. At batch 1 it also times the trunk alone (Block
A exported by itself, ONNX Runtime fp32): the floor any head on these features pays, so the
head's own cost (Block C + anomaly map) is the difference; and the position-wise Gaussian
alone (the model's `PositionGaussian` exported by itself, fed a residual), the part of that
head whose cost is reading its per-position projection. Writes JSON.

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


def export_parts(ckpt: Path, folder: Path) -> list[str]:
    """Parts of the model exported alone as ONNX, the checkpoint read once: ``trunk.onnx``
    (Block A: the frozen trunk, its resize, aggregation and standardisation; the floor every
    head on these features pays, HaloAE and PaDiM alike) and, when the model has one,
    ``gaussian.onnx`` (the position-wise Gaussian, residual -> error grid: a memory-bound part
    of the head, its projection buffer read once per frame). Returns the runtime names."""
    import torch

    from haloae.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    parts = [("trunk", model.backbone, torch.rand(1, 3, *model.cfg.hw))]
    if model.gaussian is not None:
        parts.append(("gaussian", model.gaussian,
                      torch.rand(1, model.backbone.out_channels, *model.cfg.backbone.grid_hw)))
    for name, module, x in parts:
        torch.onnx.export(module.eval(), (x,), str(folder / f"{name}.onnx"), opset_version=17,
                          dynamo=True, verbose=False)
    return [f"{name}-onnxruntime-fp32" for name, _, _ in parts]


def part_fn(path: Path, threads: int, own_input: bool = False):
    """One exported part (trunk or Gaussian) in an ONNX Runtime session with the backend's
    session options; ``own_input``: fed a fixed random input of the part's own shape instead
    of the frame."""
    import onnxruntime as ort

    from haloae.runtime.backends.onnxruntime_backend import session_options

    sess = ort.InferenceSession(str(path), session_options(ort, threads), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    own = np.random.default_rng(1).random(tuple(inp.shape), dtype=np.float32) if own_input else None
    return lambda a: sess.run(None, {inp.name: a if own is None else own})


def build_runtime(name: str, ckpt: str, bundle: str, batch: int, threads: int,
                  hw: tuple[int, int]):
    """(fn, x): one runtime's forward and its input batch."""
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
        fn = part_fn(Path(bundle) / "trunk.onnx", threads)
    elif name == "gaussian-onnxruntime-fp32":
        fn = part_fn(Path(bundle) / "gaussian.onnx", threads, own_input=True)
    else:
        fn = ort_fn(Path(bundle), "fp32" if name.endswith("fp32") else "fp16", threads)
    return fn, x


_WORKER: dict = {}


def _worker_init(name: str, ckpt: str, bundle: str, batch: int, threads: int, warmup: int,
                 hw: tuple[int, int]) -> None:
    """A runtime's own process (torch's OpenMP threads keep spinning after a forward and slowed
    ONNX Runtime in the same process by ~1.8x on 2 cores): built and warmed up once."""
    fn, x = build_runtime(name, ckpt, bundle, batch, threads, hw)
    for _ in range(warmup):
        fn(x)
    _WORKER.update(fn=fn, x=x)


def _worker_round(iters: int) -> list[float]:
    """One round: two warm-up calls, then ``iters`` timed calls (ms per call)."""
    fn, x = _WORKER["fn"], _WORKER["x"]
    for _ in range(2):
        fn(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def time_interleaved(names: list[str], ckpt: str, bundle: str, batch: int, args,
                     hw: tuple[int, int]) -> dict[str, dict]:
    """Every runtime in its own warm process, timed in ``args.rounds`` rounds that take turns
    (the order rotates each round), so the VM's slow drifts hit all of them alike and the
    ratios between them hold; per runtime the median over all rounds and each round's median."""
    ctx = multiprocessing.get_context("spawn")
    pools = {n: ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init,
                                    initargs=(n, ckpt, bundle, batch, args.threads, args.warmup, hw))
             for n in names}
    try:
        for n in names:  # start (build + warm up) one at a time: no two load the CPU together
            pools[n].submit(time.sleep, 0).result()
        calls: dict[str, list[list[float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                calls[n].append(pools[n].submit(_worker_round, args.iters).result())
                time.sleep(0.3)  # let the last runtime's spinning threads go idle
    finally:
        for pool in pools.values():
            pool.shutdown()
    out = {}
    for n in names:
        per_frame = np.array([t for rnd in calls[n] for t in rnd]) / batch
        out[n] = {"batch": batch, "iters": int(per_frame.size), "rounds": args.rounds,
                  "median_ms": float(np.median(per_frame)),
                  "p99_ms": float(np.percentile(per_frame, 99)),
                  "fps": float(1000.0 / np.median(per_frame)),
                  "round_median_ms": [round(float(np.median(np.array(rnd) / batch)), 2)
                                      for rnd in calls[n]]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a trained final.pt")
    src.add_argument("--config", help="a model config name or path (untrained weights)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch to compare with batch 1")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds: the runtimes take turns (default 5)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per runtime per round")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls when a runtime starts")
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
    for batch in sorted({1, args.batch}):
        bundle = work / f"b{batch}"
        export_bundle(ckpt_path, bundle, fp16=True, batch=batch, samples=batch, threads=args.threads)
        names = ["torch-eager", "onnxruntime-fp32", "onnxruntime-fp16", "padim-torch-eager"]
        if batch == 1:
            names += export_parts(ckpt_path, bundle)
        print(f"batch {batch}: {len(names)} runtimes, {args.rounds} interleaved rounds of "
              f"{args.iters} calls each ...", flush=True)
        timed = time_interleaved(names, str(ckpt_path), str(bundle), batch, args, hw)
        for name in names:
            r = {**timed[name], "runtime": name}
            r["gflops_achieved"] = None if name.startswith(("padim", "trunk", "gaussian")) \
                else round(flops / 1e9 * r["fps"], 2)
            results["runs"].append(r)
            print(f"{name:25s} batch {batch}: median {r['median_ms']:.2f} ms/frame, p99 "
                  f"{r['p99_ms']:.2f}, rounds {r['round_median_ms']}", flush=True)
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
        if "gaussian-onnxruntime-fp32" in ms:
            print(f"batch {batch}: of the head, the position-wise Gaussian alone "
                  f"{ms['gaussian-onnxruntime-fp32']:.2f} ms", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

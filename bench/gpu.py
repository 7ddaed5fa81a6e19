"""The model on an NVIDIA GPU with PyTorch: fp32 vs fp16 throughput and numerics.

Anyone with a CUDA GPU can run it and compare numbers across devices. It prints the GPU name,
ms/frame and frames/s at batch 1 and 8 in fp32 and fp16 (autocast), and the fp16-vs-fp32
difference of the normalised score and map (no NaN/Inf allowed). Writes JSON.

    python bench/gpu.py --config edge                       # untrained Block C: timing only
    python bench/gpu.py --checkpoint runs/mtd-edge/final.pt  # the real model: timing + numerics
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build(args):
    from haloae.train.checkpoint import load_checkpoint
    from haloae.train.config import load_model_config
    from haloae.train.fit_stats import fit_for_timing
    from haloae.train.inference import HaloAEInference
    from haloae.train.torch_model import create_model

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        return HaloAEInference(model)
    model = create_model(load_model_config(args.config))
    fit_for_timing(model)  # untrained: statistics from random images, for timing only
    return HaloAEInference(model)


def timed(module, x, fp16: bool, iters: int) -> tuple[float, tuple]:
    import torch

    def once():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            return module(x)

    for _ in range(10):
        out = once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = once()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000.0 / iters, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--config")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    module = build(args).to(device).eval()
    hw = module.cfg.hw
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "input": list(hw), "date": time.strftime("%Y-%m-%d"), "runs": [], "numerics": {}}
    print(f"GPU: {result['gpu']} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch in (1, 8):
        x = torch.rand(batch, 3, *hw, generator=gen).to(device)
        outs = {}
        for fp16 in (False, True):
            ms, out = timed(module, x, fp16, args.iters)
            outs[fp16] = [o.float() for o in out]
            run = {"batch": batch, "precision": "fp16" if fp16 else "fp32",
                   "ms_per_batch": round(ms, 3), "ms_per_frame": round(ms / batch, 3),
                   "frames_per_s": round(1000.0 * batch / ms, 1)}
            result["runs"].append(run)
            print(f"batch {batch} {run['precision']}: {run['ms_per_frame']:.3f} ms/frame, {run['frames_per_s']} frames/s")
        finite = all(torch.isfinite(o).all().item() for o in outs[True])
        d_score = (outs[True][0] - outs[False][0]).abs().max().item()
        d_map = (outs[True][1] - outs[False][1]).abs().max().item()
        result["numerics"][f"batch{batch}"] = {"fp16_finite": finite, "max_abs_score_diff": d_score,
                                               "max_abs_map_diff": d_map}
        print(f"batch {batch} fp16 vs fp32: max |Δscore| {d_score:.2e}, max |Δmap| {d_map:.2e}, finite: {finite}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    ok = all(v["fp16_finite"] for v in result["numerics"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

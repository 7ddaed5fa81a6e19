"""Interleaved A/B timing of ONNX graphs with ONNX Runtime on the CPU (batch as exported).

Rounds alternate between the graphs, so a noisy VM's slow phases hit both alike; reports each
graph's median per round and the best of them. Same session options as the runtime's ONNX
Runtime backend (no spinning, explicit threads).

    python bench/ab_graphs.py bundles/old/model.onnx bundles/new/model.onnx --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", nargs="+", help="ONNX files (static input shape)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=60, help="timed runs per graph and round")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from haloae.runtime.backends.onnxruntime_backend import session_options

    sessions = {g: ort.InferenceSession(g, session_options(ort, args.threads), providers=["CPUExecutionProvider"])
                for g in args.graphs}
    medians: dict[str, list[float]] = {g: [] for g in sessions}
    for r in range(args.rounds):
        for g, s in sessions.items():
            inp = s.get_inputs()[0]
            x = np.random.default_rng(r).random(inp.shape, dtype=np.float32)
            for _ in range(5):
                s.run(None, {inp.name: x})
            t = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                s.run(None, {inp.name: x})
                t.append(time.perf_counter() - t0)
            medians[g].append(float(np.median(t)) * 1e3)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for g, v in medians.items():
        print(f"{g}: best median {min(v):.2f} ms; medians {' '.join(f'{m:.1f}' for m in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

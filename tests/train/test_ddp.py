"""DistributedDataParallel: 2 CPU processes (gloo) under torchrun end with identical weights."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from haloae.train.synth import generate

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import CHILD_ENV, free_port  # noqa: E402

WORKER = '''
import hashlib, sys
from pathlib import Path
from haloae.train.train_config import load_train_config
from haloae.train.train_loop import train

cfg = load_train_config(sys.argv[1])
cfg.epochs, cfg.batch_size, cfg.warmup_steps = 1, 2, 1
cfg.holdout_fraction = 0.45  # 4 of 9: position statistics and thresholds get 2 each
out = Path(sys.argv[3])
res = train(cfg, Path(sys.argv[2]), out, device="cpu", progress=False)
h = hashlib.sha256()
for name, p in sorted(res.model.named_parameters()):
    h.update(name.encode())
    h.update(p.detach().cpu().numpy().tobytes())
(out.parent / f"rank{res.rank}.sha").write_text(f"{res.world_size} {h.hexdigest()}")
'''


def _param_digest(state_dict: dict, names: set[str]) -> str:
    import hashlib
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(state_dict[name].numpy().tobytes())
    return h.hexdigest()


def test_two_gloo_ranks_end_with_identical_parameters(tmp_path):
    data = tmp_path / "data"
    generate(data, seed=5, size=128, train=9, test_good=0, test_per_kind=0, progress=False)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker),
           str(REPO / "configs/train/tiny.yaml"), str(data), str(tmp_path / "run")]
    env = {**CHILD_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = (tmp_path / "rank0.sha").read_text().split()
    r1 = (tmp_path / "rank1.sha").read_text().split()
    assert r0[0] == r1[0] == "2"  # both ran in a world of two
    assert r0[1] == r1[1], "ranks diverged: gradients were not synchronised"
    # rank 0 alone wrote the run; its checkpoint holds exactly those parameters
    ckpt = torch.load(tmp_path / "run/final.pt", weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and ckpt["calibration"]["raw_image"] > 0
    assert _param_digest(ckpt["state_dict"], _parameter_names()) == r0[1]
    assert len((tmp_path / "run/log.csv").read_text().splitlines()) == 2  # header + 1 epoch


def _parameter_names() -> set[str]:
    from haloae.train.config import load_model_config
    from haloae.train.torch_model import create_model
    model = create_model(load_model_config("tiny"), pretrained=False)
    return {n for n, _ in model.named_parameters()}

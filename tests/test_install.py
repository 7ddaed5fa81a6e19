"""Installed from its wheel, outside any checkout, the package works: named configs and the
example configs come from package data, not from a clone.

The wheel is built from a copy of the source files (the checkout stays clean), installed into a
fresh venv in a temporary folder, and the console scripts run from another temporary folder.
To avoid installing torch again the fresh venv sees the dev venv's third-party packages through
a ``.pth`` file (appended to ``sys.path``, after the venv's own site-packages, and without
running the dev venv's editable-install hook); the test asserts that ``haloae`` itself is
imported from the installed wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "haloae", "train", "export", "edge", "configs", "systemd")


def _run(*args: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(bin folder of a fresh venv with the haloae wheel installed, env to run it with)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    # no build isolation: the dev venv's setuptools builds it, nothing is downloaded
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(root / "wheels"), str(src), cwd=root, env=os.environ.copy())
    wheel = next((root / "wheels").glob("haloae-*.whl"))
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=root, env=os.environ.copy())
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel), cwd=root, env=os.environ.copy())
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=root, env=os.environ.copy()).stdout.strip())
    (site / "_dev_third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="2",
               MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1", STATE_DIRECTORY=str(root / "state"))
    return venv / "bin", env


def test_installed_wheel_runs_the_pipeline_from_any_directory(installed, tmp_path):
    bin_dir, env = installed
    work = tmp_path / "elsewhere"  # no configs/ folder, no checkout
    work.mkdir()

    where = _run(str(bin_dir / "python"), "-c", "import haloae, haloae.configs; print(haloae.__file__); "
                 "print(haloae.configs.__file__)", cwd=work, env=env).stdout.split()
    venv = bin_dir.parent.resolve()
    for path in where:
        assert Path(path).resolve().is_relative_to(venv), f"haloae imported from {path}, not the wheel"
        assert not Path(path).resolve().is_relative_to(REPO.resolve())

    _run(str(bin_dir / "haloae-synth"), "--out", "data", "--seed", "0", "--size", "128", "--train", "10",
         "--test-good", "2", "--test-per-kind", "1", cwd=work, env=env)
    _run(str(bin_dir / "haloae-train"), "--config", "tiny", "--data", "data", "--out", "run", "--epochs", "1",
         "--threads", "2", "--quiet", cwd=work, env=env)
    assert (work / "run" / "final.pt").is_file()
    _run(str(bin_dir / "haloae-export"), "run/final.pt", "--out", "bundle", "--data", "data", "--samples", "2",
         "--threads", "2", cwd=work, env=env)
    assert (work / "bundle" / "manifest.json").is_file()

    # the example daemon config comes from the package too; point it at this bundle and a test source
    _run(str(bin_dir / "haloae-config"), "edge/one-camera", "--out", "edge.yaml", cwd=work, env=env)
    cfg = yaml.safe_load((work / "edge.yaml").read_text())
    cfg["cameras"][0].update(source="synthetic", kind="synthetic")
    cfg["model"].update(bundle="bundle", backend="onnxruntime")
    (work / "edge.yaml").write_text(yaml.safe_dump(cfg))
    _run(str(bin_dir / "haloae-edge"), "--config", "edge.yaml", "--validate-config", cwd=work, env=env)

    # the demo's training config and the model it names resolve from the package as well
    _run(str(bin_dir / "python"), "-c", "from haloae.train.train_config import load_train_config as l, "
         "resolve_model_config as r; assert r(l('synthetic-edge')).name == 'edge'", cwd=work, env=env)

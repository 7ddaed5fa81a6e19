"""Session fixtures shared by the whole suite: a real mosquitto broker, synthetic data and a
tiny trained model. Everything is generated here; nothing depends on ../shared or the network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Two cores: every child process of the suite gets a deliberate thread count.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


class Broker:
    """A real mosquitto on a free loopback port; ``stop()``/``start()`` bounce it on the same
    port (for outage tests). ``extra_conf`` lines are appended to the generated config."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None):
        exe = mosquitto_path()
        if exe is None:
            pytest.skip("mosquitto is not installed: run scripts/test (it installs it) or apt-get install mosquitto")
        self.exe, self.workdir, self.port = exe, workdir, port or free_port()
        self.host = "127.0.0.1"
        self.conf = workdir / "mosquitto.conf"
        workdir.mkdir(parents=True, exist_ok=True)
        base = extra_conf or "allow_anonymous true\n"
        listener = "" if "listener" in base else f"listener {self.port} 127.0.0.1\n"
        # run as root, mosquitto drops to user "mosquitto", which cannot read pytest's 0700 tmp
        # folders (password/ACL/cert files, persistence, log): stay root there.
        user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        self.conf.write_text(f"{listener}{base}{user}persistence true\npersistence_location {workdir}/\n"
                             f"log_dest file {workdir}/mosquitto.log\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    """A fresh mosquitto broker for one test (anonymous, loopback, free port)."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def run_cli(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console command (``haloae-…``) as a user would, through ``python -m``-free entry points."""
    proc = subprocess.run([*args], capture_output=True, text=True, timeout=timeout, env=env or CHILD_ENV, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def bin_path(name: str) -> str:
    """The console script next to this interpreter (works inside a venv without activation)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A deterministic synthetic MVTec-layout data set (haloae-synth --seed 0)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    run_cli(bin_path("haloae-synth"), "--out", str(out), "--seed", "0")
    return out


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, synth_data) -> tuple[Path, Path]:
    """(final checkpoint, data dir) of the tiny config trained on the synthetic set."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    run_cli(bin_path("haloae-train"), "--config", str(REPO / "configs/train/tiny.yaml"),
            "--data", str(synth_data), "--out", str(run))
    ckpt = run / "final.pt"
    assert ckpt.is_file(), f"haloae-train wrote no {ckpt}"
    return ckpt, synth_data


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, trained_tiny) -> Path:
    """A bundle exported (haloae-export --fp16) from the tiny trained checkpoint."""
    ckpt, data = trained_tiny
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    run_cli(bin_path("haloae-export"), str(ckpt), "--out", str(out), "--data", str(data),
            "--samples", "4", "--fp16")
    return out



@pytest.fixture(scope="session")
def fit_untrained():
    """``fit_for_timing(model, n=6, seed=0)``: every statistic of an untrained HaloAE fitted on
    random images (as haloae-train fits them after training); returns the calibration dict."""
    from haloae.train.fit_stats import fit_for_timing
    return fit_for_timing

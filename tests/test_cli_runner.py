"""The error contract of every console script (docs/architecture.md, "Errors and exit codes").

A user error prints one line and exits 2, a failure prints one line and exits 1, a bug prints
its traceback and exits 1, and ``--version`` works everywhere. The console scripts are read
from pyproject.toml and called in-process (``main(argv)``), as the installed entry points do.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tomllib

import pytest

import haloae
from conftest import REPO, bin_path, free_port, run_cli
from haloae import cli
from haloae.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER, Failure, HaloaeError, UserError

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _main(prog: str):
    module, func = SCRIPTS[prog].split(":")
    return importlib.import_module(module), getattr(importlib.import_module(module), func)


@pytest.fixture
def no_hard_exit(monkeypatch):
    """haloae-edge's main() ends with os._exit (blocked camera threads): turn it into SystemExit
    and keep pytest's logging handlers open."""
    def fake_exit(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr("logging.shutdown", lambda: None)


def _call(prog: str, argv: list[str], capsys) -> tuple[int, str, str]:
    _, main = _main(prog)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# -- haloae/cli.py itself ----------------------------------------------------------------------

def test_run_prints_a_user_error_as_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("HALOAE_TRACEBACK", raising=False)

    def body(argv):
        raise UserError(f"--config {argv[0]} not found; pass a YAML file")

    assert cli.run("haloae-x", body, ["a.yaml"]) == EXIT_USER == 2
    assert capsys.readouterr().err == "haloae-x: error: --config a.yaml not found; pass a YAML file\n"


def test_run_prints_a_failure_as_one_line_exit_1(capsys, monkeypatch):
    monkeypatch.delenv("HALOAE_TRACEBACK", raising=False)

    def body(argv):
        raise Failure("parity above tolerance")

    assert cli.run("haloae-x", body, []) == EXIT_FAILED == 1
    assert capsys.readouterr().err == "haloae-x: failed: parity above tolerance\n"


def test_run_shows_the_traceback_of_a_bug_exit_1(capsys):
    def body(argv):
        return int("not a number")  # a ValueError: a bug, never passed off as bad input

    assert cli.run("haloae-x", body, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ValueError: invalid literal" in err
    assert _lines(err)[-1] == ("haloae-x: internal error (a bug, not your input): please report the "
                               "traceback above")


def test_run_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("HALOAE_TRACEBACK", "1")

    def body(argv):
        raise UserError("bad input")

    assert cli.run("haloae-x", body, []) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "haloae.errors.UserError: bad input" in err
    assert _lines(err)[-1] == "haloae-x: error: bad input"


def test_run_return_codes_interrupt_and_argparse_exits(capsys):
    assert cli.run("haloae-x", lambda argv: None, []) == 0
    assert cli.run("haloae-x", lambda argv: 3, []) == 3

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.run("haloae-x", interrupted, [], interrupted_hint="continue with --resume") == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "haloae-x: interrupted; continue with --resume\n"

    def usage(argv):
        argparse.ArgumentParser(prog="haloae-x").parse_args(argv)

    with pytest.raises(SystemExit) as exc:  # argparse's own exits pass through untouched
        cli.run("haloae-x", usage, ["--nope"])
    assert exc.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_add_version(capsys):
    parser = cli.add_version(argparse.ArgumentParser(prog="haloae-x"))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"haloae-x {haloae.__version__}\n"


@pytest.mark.parametrize("where, name, kind, builtin", [
    ("haloae.edge.config", "ConfigError", UserError, ValueError),
    ("haloae.train.config", "ConfigError", UserError, ValueError),
    ("haloae.edge.model_swap", "ModelRefused", UserError, ValueError),
    ("haloae.edge.commands", "CommandError", UserError, ValueError),
    ("haloae.edge.settings", "SettingError", UserError, ValueError),
    ("haloae.edge.feedback", "FeedbackError", UserError, ValueError),
    ("haloae.zones", "ZonesError", UserError, ValueError),
    ("haloae.edge.outbox", "OutboxError", UserError, Exception),
    ("haloae.runtime", "BackendUnavailable", UserError, RuntimeError),
    ("haloae.train.train_loop", "RunError", UserError, ValueError),
    ("haloae.train.calibration", "CalibrationError", UserError, ValueError),
    ("haloae.train.ddp", "DeviceError", UserError, ValueError),
    ("haloae.train.data", "ImageReadError", UserError, ValueError),
    ("haloae.train.data", "DataError", UserError, ValueError),
    ("haloae.train.checkpoint", "CheckpointError", UserError, ValueError),
    ("haloae.train.backbones", "BackboneWeightsError", UserError, FileNotFoundError),
    ("haloae.manifest", "BundleError", UserError, ValueError),
    ("haloae.export.onnx_export", "ExportError", Failure, RuntimeError),
    ("haloae.export.parity", "ParityError", Failure, RuntimeError),
    ("haloae.runtime.trt_engine", "EngineError", Failure, RuntimeError),
    ("haloae.runtime.trt_engine", "TensorRTUnavailable", Failure, RuntimeError),
    ("haloae.export.trt_ops", "UnsupportedGraphError", Failure, ValueError),
    ("haloae.edge.capture", "SourceLost", HaloaeError, Exception),
])
def test_every_stage_error_has_its_place_in_the_hierarchy(where, name, kind, builtin):
    """Each error maps to its exit code and still is the builtin callers used to catch."""
    cls = getattr(importlib.import_module(where), name)
    assert issubclass(cls, kind) and issubclass(cls, builtin)
    assert cls("x").exit_code == (EXIT_USER if kind is UserError else EXIT_FAILED)


# -- every console script ----------------------------------------------------------------------

@pytest.mark.parametrize("prog", sorted(SCRIPTS))
def test_version(prog, capsys, no_hard_exit):
    code, out, _ = _call(prog, ["--version"], capsys)
    assert code == 0 and out == f"{prog} {haloae.__version__}\n"


def test_installed_script_version():
    """The installed entry point itself (not only main()): a fresh process, exit 0."""
    proc = run_cli(bin_path("haloae-edge"), "--version")
    assert proc.stdout.strip() == f"haloae-edge {haloae.__version__}"


def _boom(*args, **kwargs):
    raise ValueError("deliberate bug inside the code path")


# prog -> (the function made to fail inside main()'s code path, argv reaching it)
BUG_PATHS = {
    "haloae-train": ("haloae.train.cli.load_train_config", ["--config", "c.yaml", "--data", "d", "--out", "o"]),
    "haloae-eval": ("haloae.train.eval_cli._check_source", ["--checkpoint", "c.pt", "--data", "d", "--out", "o"]),
    "haloae-export": ("haloae.bundle.verify_bundle", ["--verify", "b"]),
    "haloae-edge": ("haloae.edge.__main__.load_config", ["--config", "c.yaml", "--validate-config"]),
    "haloae-synth": ("haloae.train.synth.generate", ["--out", "o", "--seed", "0"]),
    "haloae-collect": ("haloae.edge.collect.collect", ["--config", "c.yaml", "--camera", "cam0", "--out", "o"]),
    "haloae-retrain": ("haloae.train.retrain.run", ["--config", "c.yaml", "--data", "d", "--current", "b",
                                                    "--out", "o"]),
    "haloae-monitor": ("haloae.edge.monitor._broker", ["--broker", "localhost"]),
    "haloae-demo": ("haloae.demo.prepare_bundle", ["--workdir", "wd"]),
    "haloae-config": ("haloae.named_configs.read_text", ["edge/one-camera"]),
}


@pytest.mark.parametrize("prog", sorted(BUG_PATHS))
def test_a_bug_shows_its_traceback_and_exits_1(prog, tmp_path, capsys, monkeypatch, no_hard_exit):
    target, argv = BUG_PATHS[prog]
    monkeypatch.chdir(tmp_path)
    _main(prog)  # import first, so that the target can be patched
    monkeypatch.setattr(target, _boom)
    code, _, err = _call(prog, argv, capsys)
    assert code == 1, err
    assert "Traceback (most recent call last):" in err and "ValueError: deliberate bug" in err, err
    assert _lines(err)[-1].startswith(f"{prog}: internal error (a bug, not your input)"), err


def test_bugs_are_covered_for_every_script():
    assert set(BUG_PATHS) == set(SCRIPTS)


def _bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    """prog -> (argv with one bad input, a text the one line must contain)."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    missing = str(tmp_path / "missing.yaml")
    return {
        "haloae-train": (["--config", missing, "--data", "d", "--out", "o"], "missing.yaml' not found"),
        "haloae-eval": (["--checkpoint", str(tmp_path / "nope.pt"), "--data", "d", "--out", "o"], "nope.pt"),
        "haloae-export": (["--verify", str(tmp_path / "no-bundle")], "no-bundle"),
        "haloae-edge": (["--config", missing, "--validate-config"], "missing.yaml"),
        "haloae-synth": (["--out", str(foreign), "--seed", "0", "--train", "1"], "not empty"),
        "haloae-collect": (["--config", missing, "--camera", "cam0", "--out", "o"], "missing.yaml"),
        "haloae-retrain": (["--config", missing, "--data", "d", "--current", str(tmp_path / "no-bundle"),
                            "--out", str(tmp_path / "run")], "is not a bundle folder"),
        "haloae-monitor": (["--broker", "localhost:http"], "--broker localhost:http"),
        "haloae-demo": (["--workdir", str(tmp_path / "wd"), "--bundle", str(tmp_path / "b"),
                         "--broker", f"127.0.0.1:{free_port()}"], "no MQTT broker answers"),
        "haloae-config": (["edge/no-such-config"], "no shipped config 'edge/no-such-config'"),
    }


@pytest.mark.parametrize("prog", sorted(SCRIPTS))
def test_bad_input_is_one_line_exit_2(prog, tmp_path, capsys, monkeypatch, no_hard_exit):
    monkeypatch.chdir(tmp_path)
    argv, expected = _bad_inputs(tmp_path)[prog]
    code, _, err = _call(prog, argv, capsys)
    lines = _lines(err)
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith(f"{prog}: ") and " error: " in lines[0] and expected in lines[0], lines
    assert "Traceback" not in err
    assert (tmp_path / "foreign" / "mine.txt").read_text() == "keep me"

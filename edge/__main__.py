"""``haloae-edge``: the inspection daemon (camera → HaloAE → MQTT).

User errors at start (bad config, missing file, bad bundle, missing camera library,
unavailable backend, unusable state folder: any `haloae.errors.UserError`) print ONE line
``haloae-edge: <kind> error: <key path>: <what to do>`` on stderr and exit with code 2
(systemd: ``RestartPreventExitStatus=2``); no traceback. Everything else goes through the one
CLI runner (`haloae.cli.run`): a bug shows its traceback and exits 1. Imports nothing heavy (no
torch, no onnx, no onnxruntime) until a backend is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from haloae import cli
from haloae.errors import EXIT_USER, UserError

from .config import load_config

EPILOG = """examples:
  haloae-edge --config configs/edge/one-camera.yaml
  haloae-edge --config configs/edge/one-camera.yaml --validate-config
  haloae-edge --config replay.yaml --exit-when-done --log-level DEBUG
  systemctl reload haloae-edge   # SIGHUP: re-read the config, re-verify and reload the bundle

exit codes: 0 stopped, 1 runtime failure (systemd restarts it), 2 configuration error (also:
--exit-when-done and nothing could be inspected).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="haloae-edge", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="daemon YAML (see configs/edge/*.yaml)")
    p.add_argument("--validate-config", action="store_true",
                   help="check the config, its files, camera sources and the bundle, then exit (0 = valid)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit when every camera is a finite file/folder that has ended and all frames are "
                        "published (replays, tests, benchmarks)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="override health.log_level")
    cli.add_version(p)
    return p.parse_args(argv)


def _setup_logging(level: str) -> None:
    # under systemd (JOURNAL_STREAM set) journald adds the time itself
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    for noisy in ("urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(kind: str, msg: object) -> int:
    print(f"haloae-edge: {kind} error: {' '.join(str(msg).split())}", file=sys.stderr)
    return EXIT_USER


def _kind(err: UserError) -> tuple[str, str]:
    """(kind, key path) of the one line for a start-up error (docs/operations.md lists them)."""
    from haloae.manifest import BundleError

    from haloae.runtime import BackendUnavailable
    from .outbox import OutboxError

    for cls, kind, where in ((OutboxError, "state", "state_dir: "), (BundleError, "bundle", "model.bundle: "),
                             (BackendUnavailable, "backend", "model.backend: ")):
        if isinstance(err, cls):
            return kind, where
    return "config", ""


def _quiet_opencv() -> None:
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # older OpenCV without the logging module
        pass


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        app = _prepared(args)
    except UserError as e:
        kind, where = _kind(e)
        return _fail(kind, f"{where}{e}")
    except OSError as e:  # state_dir not writable, outbox unreadable, disk full
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return _fail("state", f"state_dir{where}: {e.strerror or e}; check that the folder exists and "
                              "this user may write it (systemd: StateDirectory=)")
    if args.validate_config:
        print(f"haloae-edge: config OK: node {app.cfg.node}, {len(app.cfg.cameras)} camera(s), "
              f"bundle {app.cfg.model.bundle}, backend {app.backend.description}")
        return 0
    app.install_signal_handlers()
    return app.run()


def _prepared(args: argparse.Namespace):
    """The daemon with its config read and checked, bundle verified and backend loaded."""
    cfg = load_config(args.config)
    _setup_logging(args.log_level or ("WARNING" if args.validate_config else cfg.health.log_level))
    _quiet_opencv()
    from .app import EdgeApp

    app = EdgeApp(cfg, exit_when_done=args.exit_when_done, config_path=Path(args.config))
    app.prepare(serve=not args.validate_config)
    return app


def main(argv: list[str] | None = None) -> None:
    # a bug: traceback, exit 1; Ctrl-C before the signal handlers are installed: exit 130
    code = cli.run("haloae-edge", run, argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # capture threads blocked in a camera read cannot be joined; do not let them delay the exit
    os._exit(code)


if __name__ == "__main__":
    main()

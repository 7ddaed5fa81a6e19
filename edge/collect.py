"""``haloae-collect``: training images from a configured camera, exactly as the daemon sees them.

Frames come from the camera of an edge YAML through the daemon's own code (``edge/capture.py``:
the same source, the same frame checks, the same ROI crop, the same BGR -> RGB), and are saved
lossless (PNG) at the cropped resolution into ``OUT/train/good/``, the layout ``haloae-train``
reads; training then resizes them with ``cv2.INTER_AREA`` exactly as the daemon's
``infer.preprocess`` does, so a collected image gives the model the very input the live frame
gave. Frames that would teach the model little are skipped and counted:

- ``dark``: mean brightness below ``--min-brightness`` (a covered lens, lights off);
- ``blurred``: sharpness (variance of the Laplacian) below ``--blur-ratio`` x the median of the
  frames kept so far (motion blur, a part moving through);
- ``near-duplicate``: mean absolute difference to the last kept frame below ``--min-change``
  grey levels (a stopped line).

``--every S`` keeps at most one frame per S seconds of the source's clock: a video file's own
frame rate (or ``fps`` of the camera), wall-clock time for live cameras. Imports nothing beyond
the daemon's core (no torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from haloae import cli
from haloae.errors import EXIT_INTERRUPTED, UserError

from .capture import BadFrame, SourceEnded, SourceLost, check_source, make_source, source_kind, to_rgb
from .config import ConfigError, load_config

log = logging.getLogger(__name__)

EPILOG = """examples:
  # 300 good frames from cam0 of the daemon's config, one every 2 s, into data/line7/train/good
  haloae-collect --config /etc/haloae/edge.yaml --camera cam0 --out data/line7 --count 300 --every 2

  # from a recorded video (a camera with source: line.avi in the YAML), every frame that passes
  haloae-collect --config replay.yaml --camera cam0 --out data/replay

  # then train on them
  haloae-train --config configs/train/mtd-edge.yaml --data data/line7 --out runs/line7

Collect only while the line runs GOOD parts: every kept frame is a training example of normal.
OUT/collect.json records the camera, ROI and counts. Stop early with Ctrl-C (the summary is printed).
exit codes: 0 done, 2 bad config / camera / output folder, 130 interrupted with nothing kept.
"""

LIVE_KINDS = ("v4l2", "url", "gstreamer", "synthetic")


@dataclass
class Tally:
    kept: int = 0
    read: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"dark": 0, "blurred": 0, "near-duplicate": 0,
                                                             "unusable": 0, "between --every": 0})
    changes: list[float] = field(default_factory=list)  # difference of each kept frame to the previous one
    sharpness: list[float] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (width, height) after the ROI
    folder: Path | None = None
    existing: int = 0  # frames of this camera already in the folder
    interrupted: bool = False


def _small_grey(rgb: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image at <= 512 px (higher = sharper)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = 512.0 / max(grey.shape)
    if scale < 1.0:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


class Collector:
    """Judges frames (dark / blurred / near-duplicate) and saves the kept ones."""

    def __init__(self, out: Path, camera: str, min_brightness: float, blur_ratio: float, min_change: float):
        self.folder = out / "train" / "good"
        self.camera, self.min_brightness, self.blur_ratio, self.min_change = camera, min_brightness, blur_ratio, \
            min_change
        self.tally = Tally()
        self._last: np.ndarray | None = None
        self._next_index = 1 + max((int(p.stem.rsplit("_", 1)[1]) for p in self.folder.glob(f"{camera}_*.png")
                                    if p.stem.rsplit("_", 1)[1].isdigit()), default=0)
        self.existing = self._next_index - 1

    def offer(self, rgb: np.ndarray) -> str | None:
        """Save ``rgb`` (RGB uint8, after the ROI) unless it is skipped; returns the skip reason."""
        small = _small_grey(rgb)
        if float(small.mean()) < self.min_brightness:
            return self._skip("dark")
        sharp = sharpness(rgb)
        t = self.tally
        if len(t.sharpness) >= 5 and sharp < self.blur_ratio * float(np.median(t.sharpness)):
            return self._skip("blurred")
        change = None if self._last is None else float(np.mean(np.abs(small - self._last)))
        if change is not None and change < self.min_change:
            return self._skip("near-duplicate")
        path = self.folder / f"{self.camera}_{self._next_index:06d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
        self._next_index += 1
        self._last = small
        t.kept += 1
        t.sharpness.append(sharp)
        if change is not None:
            t.changes.append(change)
        t.size = (rgb.shape[1], rgb.shape[0])
        return None

    def _skip(self, why: str) -> str:
        self.tally.skipped[why] += 1
        return why


class Progress:
    """One status line: redrawn in place on a terminal, a line every 10 % otherwise."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self._last_step = -1

    def update(self, tally: Tally, force: bool = False) -> None:
        done = min(tally.kept, self.total)
        step = done * 10 // max(self.total, 1)
        if not (self.tty or force or step > self._last_step):
            return
        self._last_step = step
        filled = done * 30 // max(self.total, 1)
        skipped = sum(tally.skipped.values())
        line = f"collecting [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} kept, {skipped} skipped"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _clock(kind: str, cap_fps: float | None, index: int, arrived: float) -> float:
    """Seconds on the source's clock of frame ``index``: its frame rate for files and folders."""
    if kind in LIVE_KINDS or not cap_fps:
        return arrived
    return index / cap_fps


def _file_fps(cam) -> float | None:
    if cam.fps:
        return float(cam.fps)
    if source_kind(cam) != "file":
        return 1.0  # a folder without fps: one image = one second
    cap = cv2.VideoCapture(cam.source)
    fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    cap.release()
    return fps if fps and fps > 0 else 25.0


def collect(args: argparse.Namespace) -> Tally:
    cfg = load_config(args.config, check=False)  # no bundle needed: collecting comes before training
    ids = [c.id for c in cfg.cameras]
    if args.camera not in ids:
        raise ConfigError(f"--camera {args.camera}: no such camera in {args.config}; cameras: {', '.join(ids)}")
    index = ids.index(args.camera)
    cam = cfg.cameras[index].model_copy(update={"loop": False})  # a file is read once
    check_source(cam, index)
    out = Path(args.out)
    try:
        (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create {out / 'train' / 'good'} ({e.strerror}); use a writable folder")
    col = Collector(out, cam.id, args.min_brightness, args.blur_ratio, args.min_change)
    kind, fps = source_kind(cam), _file_fps(cam)
    source = make_source(cam)
    bar = None if args.quiet else Progress(args.count)
    expected, last_kept_t, interrupted = None, None, False
    try:
        source.open()
        while col.tally.kept < args.count:
            try:
                raw = source.read()
                col.tally.read += 1
                rgb = to_rgb(raw, source.rgb, expected, cam.roi)  # the daemon's checks and ROI crop
            except BadFrame as e:
                col.tally.skipped["unusable"] += 1
                log.debug("frame %d unusable: %s", col.tally.read, e)
                continue
            except SourceEnded:
                break
            expected = expected or raw.shape[:2]
            t = _clock(kind, fps, col.tally.read - 1, source.arrived)
            if args.every and last_kept_t is not None and t - last_kept_t < args.every:
                col.tally.skipped["between --every"] += 1
                continue
            if col.offer(rgb) is None:
                last_kept_t = t
            if bar is not None:
                bar.update(col.tally)
    except SourceLost as e:
        raise ConfigError(f"camera {cam.id}: {e}; {col.tally.kept} frame(s) kept in {col.folder}") from None
    except KeyboardInterrupt:
        interrupted = True
    finally:
        source.close()
        if bar is not None:
            bar.update(col.tally, force=True)
            bar.close()
    _write_record(out, args, cam, col)
    col.tally.interrupted, col.tally.folder, col.tally.existing = interrupted, col.folder, col.existing
    return col.tally


def _write_record(out: Path, args, cam, col: Collector) -> None:
    t = col.tally
    record_path = out / "collect.json"
    runs = json.loads(record_path.read_text()).get("runs", []) if record_path.is_file() else []
    runs.append({"camera": cam.id, "config": str(Path(args.config).resolve()), "source": cam.source,
                 "roi": list(cam.roi) if cam.roi else None, "size": list(t.size) if t.size else None,
                 "kept": t.kept, "read": t.read, "skipped": t.skipped,
                 "median_change": float(np.median(t.changes)) if t.changes else None,
                 "settings": {"every": args.every, "min_brightness": args.min_brightness,
                              "blur_ratio": args.blur_ratio, "min_change": args.min_change},
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    record_path.write_text(json.dumps({"v": 1, "runs": runs}, indent=1) + "\n")


def summary(t: Tally, args) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in t.skipped.items() if n) or "none"
    size = f" ({t.size[0]}x{t.size[1]} after the roi)" if t.size else ""
    similar = (f"; kept frames differ from the previous one by {np.median(t.changes):.1f} grey levels "
               f"(median; --min-change {args.min_change})" if t.changes else "")
    lines = [f"kept {t.kept} of {t.read} frame(s) read from camera {args.camera}{size} in {t.folder}"
             + (f" (after {t.existing} already there)" if t.existing else ""),
             f"skipped: {skipped}{similar}"]
    if t.kept < args.count:
        lines.append(f"stopped before --count {args.count}: "
                     + ("interrupted" if t.interrupted else "the source ended"))
    if t.kept:
        lines.append(f"next: haloae-train --config configs/train/mtd-edge.yaml --data {args.out} --out runs/NAME")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="haloae-collect", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the edge daemon's YAML (cameras, roi)")
    p.add_argument("--camera", required=True, help="camera id in that config")
    p.add_argument("--out", required=True, type=Path, help="data folder; frames go to OUT/train/good/")
    p.add_argument("--count", type=int, default=200, help="frames to keep (200)")
    p.add_argument("--every", type=float, default=0.0, metavar="S",
                   help="keep at most one frame per S seconds of the source (0 = any frame that passes)")
    p.add_argument("--min-brightness", type=float, default=20.0, help="mean grey level below which a frame is dark (20)")
    p.add_argument("--blur-ratio", type=float, default=0.5,
                   help="sharpness below this fraction of the kept frames' median = blurred (0.5)")
    p.add_argument("--min-change", type=float, default=1.0,
                   help="mean grey-level difference to the last kept frame below which it is a near-duplicate (1.0)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    cli.add_version(p)
    args = p.parse_args(argv)
    if args.count < 1 or args.every < 0 or args.blur_ratio < 0 or args.min_change < 0:
        p.error("--count must be >= 1; --every, --blur-ratio and --min-change >= 0")
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        tally = collect(args)
    except OSError as e:  # a frame that cannot be written: the disk, not a bug
        raise UserError(f"{e}; check that --out is writable and has space") from e
    print(summary(tally, args))
    return EXIT_INTERRUPTED if tally.interrupted and not tally.kept else 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("haloae-collect", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The bundle manifest (``manifest.json``, version 1) as a frozen dataclass (core: stdlib only).

This module is the ONLY reader and writer of ``manifest.json``: :func:`read_manifest` parses and
checks it into a :class:`Manifest` (every refusal a :class:`BundleError` naming the key and what
to do), :meth:`Manifest.write` writes it back, :meth:`Manifest.create` assembles a new one for
``haloae-export``. The on-disk format is documented in docs/bundle.md; ``Manifest.from_dict(d)
.to_dict() == d`` for every manifest this module writes, so the format stays byte-compatible.

The thresholds are in normalised units: the calibrated raw thresholds (``raw_image``,
``raw_pixel``, what the graph divides by) map to :data:`THRESHOLD_TARGET` (0.5) in the outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError
from .validate import check_threshold, strict_json

FORMAT = "haloae-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FP32 = "model.onnx"
MODEL_FP16 = "model.fp16.onnx"
THRESHOLD_TARGET = 0.5  # the calibrated thresholds sit here in the normalised outputs
INPUT_SCALE = 1.0 / 255.0  # uint8 -> [0, 1]; haloae.preprocess uses this very constant
NORMALISATION_FORMULA = (
    "score = 0.5 * score_raw / raw_image; anomaly_map = 0.5 * map_raw / raw_pixel "
    "(the calibrated thresholds map to 0.5)"
)
HINT = "re-export it with `haloae-export CHECKPOINT --out DIR`"
_SECTIONS = ("input", "outputs", "threshold", "files", "model")
_THRESHOLD_KEYS = ("image", "pixel", "raw_image", "raw_pixel", "formula")
_INPUT_FIXED = {"dtype": "float32", "layout": "NCHW", "color": "RGB", "normalization": "in-graph",
                "resize": "INTER_AREA"}  # what every backend and haloae.preprocess assume


class BundleError(UserError, ValueError):
    """A bundle is missing, incomplete, tampered with or of an unknown version."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph output: its name and static shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    """The graph input and how an image becomes it (docs/bundle.md, haloae.preprocess)."""

    name: str
    shape: tuple[int, int, int, int]  # N, 3, H, W (static)
    mean: tuple[float, ...] = ()  # backbone normalisation, applied inside the graph
    std: tuple[float, ...] = ()
    scale: float = INPUT_SCALE
    dtype: str = "float32"
    layout: str = "NCHW"
    color: str = "RGB"
    normalization: str = "in-graph"
    resize: str = "INTER_AREA"

    @property
    def hw(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]


@dataclass(frozen=True)
class Thresholds:
    """Image / pixel thresholds (normalised), the raw calibrated values and how they were set."""

    image: float = THRESHOLD_TARGET
    pixel: float = THRESHOLD_TARGET
    raw_image: float | None = None  # the calibrated raw image score (what the graph divides by)
    raw_pixel: float | None = None
    formula: str | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict)  # method, quantile, normal_scores...

    @property
    def normal_scores(self) -> Mapping[str, Any]:
        """Statistics of the held-out normal raw scores (the drift baseline); {} when absent."""
        stats = self.calibration.get("normal_scores")
        return stats if isinstance(stats, dict) else {}


@dataclass(frozen=True)
class FileEntry:
    """A model file of the bundle."""

    sha256: str
    bytes: int
    precision: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A checked version-1 manifest. ``model`` and ``parity`` are free-form records."""

    input: InputSpec
    score: TensorSpec
    anomaly_map: TensorSpec
    threshold: Thresholds
    files: Mapping[str, FileEntry]
    model: Mapping[str, Any]
    parity: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # other top-level keys, kept as read

    # -- derived ----------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.input.shape[0]

    @property
    def model_config(self) -> dict | None:
        """``model.config`` (the ModelCfg as a dict), None when absent."""
        cfg = self.model.get("config")
        return cfg if isinstance(cfg, dict) else None

    def model_id(self, bundle_hash: str) -> str:
        """``model.id``, else ``<model.name>-<first 12 hex of the bundle hash>``."""
        return str(self.model.get("id") or f"{self.model.get('name', 'haloae')}-{bundle_hash[:12]}")

    def model_file(self, precision: str = "fp32") -> str:
        """File name of the ONNX graph for ``precision`` (fp16 falls back to fp32)."""
        if precision not in ("fp32", "fp16"):
            raise BundleError(f"unknown precision {precision!r}: use fp32 or fp16")
        return MODEL_FP16 if precision == "fp16" and MODEL_FP16 in self.files else MODEL_FP32

    # -- build / convert --------------------------------------------------------------------
    @classmethod
    def create(cls, *, input_name: str, input_shape: list[int], mean: list[float], std: list[float],
               output_names: Mapping[str, str], threshold: Mapping[str, Any],
               files: Mapping[str, Mapping[str, Any]], model: Mapping[str, Any],
               parity: Mapping[str, Any]) -> "Manifest":
        """A new manifest (``haloae-export``); ``threshold`` holds ``raw_image``/``raw_pixel`` and
        the calibration record; image and pixel thresholds start at :data:`THRESHOLD_TARGET`."""
        n, _, h, w = input_shape
        doc = {
            "format": FORMAT, "version": VERSION,
            "input": {"name": input_name, "shape": list(input_shape), "scale": INPUT_SCALE,
                      "mean": list(mean), "std": list(std), **_INPUT_FIXED},
            "outputs": {"score": {"name": output_names["score"], "shape": [n]},
                        "anomaly_map": {"name": output_names["anomaly_map"], "shape": [n, 1, h, w]}},
            "threshold": {"image": THRESHOLD_TARGET, "pixel": THRESHOLD_TARGET,
                          "formula": NORMALISATION_FORMULA, **threshold},
            "files": {k: dict(v) for k, v in files.items()}, "model": dict(model), "parity": dict(parity),
        }
        return cls.from_dict(doc, "the new manifest")

    @classmethod
    def from_dict(cls, doc: object, where: str = MANIFEST) -> "Manifest":
        """Check a parsed manifest; :class:`BundleError` names ``where`` and the key."""
        return _parse(cls, doc, where)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (docs/bundle.md)."""
        inp = self.input
        thr = self.threshold
        threshold: dict[str, Any] = {"image": thr.image, "pixel": thr.pixel}
        for key in ("raw_image", "raw_pixel", "formula"):
            if getattr(thr, key) is not None:
                threshold[key] = getattr(thr, key)
        threshold.update(_plain(thr.calibration))
        files = {}
        for name, e in self.files.items():
            files[name] = {"sha256": e.sha256, "bytes": e.bytes}
            if e.precision is not None:
                files[name]["precision"] = e.precision
        return {
            **_plain(self.extra), "format": FORMAT, "version": VERSION,
            "input": {"name": inp.name, "shape": list(inp.shape), "dtype": inp.dtype, "layout": inp.layout,
                      "color": inp.color, "scale": inp.scale, "mean": list(inp.mean), "std": list(inp.std),
                      "normalization": inp.normalization, "resize": inp.resize},
            "outputs": {"score": {"name": self.score.name, "shape": list(self.score.shape)},
                        "anomaly_map": {"name": self.anomaly_map.name, "shape": list(self.anomaly_map.shape)}},
            "threshold": threshold, "files": files, "model": _plain(self.model), "parity": _plain(self.parity),
        }

    def write(self, bundle_dir: Path) -> Path:
        """Write ``manifest.json`` into ``bundle_dir`` (sorted keys, indented); returns its path."""
        path = Path(bundle_dir) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def _plain(value: Any) -> Any:
    """A deep copy of JSON-like data (so a caller can never edit a manifest in place)."""
    return json.loads(json.dumps(value))


def read_manifest(bundle_dir: Path) -> Manifest:
    """Read and check ``<bundle_dir>/manifest.json`` (no file hashes: see haloae.bundle)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist: pass the folder that "
                          f"`haloae-export --out` wrote, or {HINT}")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a complete bundle; {HINT}")
    try:
        doc = strict_json(path.read_bytes().decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path} is not UTF-8 text (byte {exc.start}); {HINT}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {HINT}") from None
    except ValueError as exc:  # a duplicate key, NaN or Infinity
        raise BundleError(f"{exc}; {HINT}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}; check its permissions") from None
    return Manifest.from_dict(doc, str(path))


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` has a manifest file (cheap; :func:`read_manifest` checks it)."""
    return (Path(folder) / MANIFEST).is_file()


# -- parsing (every refusal names the key) ---------------------------------------------------
def _parse(cls, doc: object, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{where} is not a HaloAE bundle manifest (format must be '{FORMAT}'); {HINT}")
    if doc.get("version") != VERSION:
        raise BundleError(f"{where} has manifest version {doc.get('version')!r}, this haloae reads version "
                          f"{VERSION}: {HINT} using this haloae version")
    missing = [k for k in _SECTIONS if not isinstance(doc.get(k), dict)]
    if missing:
        raise BundleError(f"{where} lacks the section(s) {', '.join(missing)}; {HINT}")
    if "parity" in doc and not isinstance(doc["parity"], dict):
        raise BundleError(f"{where}: parity must be a mapping; {HINT}")
    inp = _input(doc["input"], where)
    n, _, h, w = inp.shape
    outs = {key: _output(doc["outputs"], key, want, inp.shape, where)
            for key, want in (("score", [n]), ("anomaly_map", [n, 1, h, w]))}
    names = [inp.name, outs["score"].name, outs["anomaly_map"].name]
    if len(set(names)) != 3:
        raise BundleError(f"{where}: input.name, outputs.score.name and outputs.anomaly_map.name must be three "
                          f"different non-empty names, got {names!r}; {HINT}")
    extra = {k: v for k, v in doc.items() if k not in (*_SECTIONS, "format", "version", "parity")}
    return cls(input=inp, score=outs["score"], anomaly_map=outs["anomaly_map"],
               threshold=_thresholds(doc["threshold"], where), files=_files(doc["files"], where),
               model=_plain(doc["model"]), parity=_plain(doc.get("parity", {})), extra=_plain(extra))


def _input(sec: dict, where: str) -> InputSpec:
    shape = sec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) and shape[1] == 3):
        raise BundleError(f"{where}: input.shape must be [N, 3, H, W] positive integers, got {shape!r}; {HINT}")
    name = sec.get("name")
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: input.name must be the graph input's name (text), got {name!r}; {HINT}")
    for key, want in _INPUT_FIXED.items():
        if sec.get(key, want) != want:
            raise BundleError(f"{where}: input.{key} is {sec.get(key)!r}, this haloae feeds {want!r}; {HINT}")
    scale = sec.get("scale", INPUT_SCALE)
    if not finite_positive(scale) or abs(scale - INPUT_SCALE) > 1e-9:
        raise BundleError(f"{where}: input.scale is {scale!r}, this haloae scales images by 1/255; {HINT}")
    stats = {}
    for key in ("mean", "std"):
        v = sec.get(key, [])
        if not (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                            and math.isfinite(x) for x in v)):
            raise BundleError(f"{where}: input.{key} must be a list of numbers, got {v!r}; {HINT}")
        stats[key] = tuple(float(x) for x in v)
    return InputSpec(name=name, shape=tuple(shape), scale=float(scale), **stats)


def _output(outs: dict, key: str, want: list[int], shape: list[int], where: str) -> TensorSpec:
    out = outs.get(key)
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
        raise BundleError(f"{where}: outputs.{key}.name is missing; {HINT}")
    if out.get("shape") != want:
        raise BundleError(f"{where}: outputs.{key}.shape is {out.get('shape')!r} but the input shape "
                          f"{list(shape)} implies {want}; {HINT}")
    if not out["name"]:
        raise BundleError(f"{where}: outputs.{key}.name is empty; {HINT}")
    return TensorSpec(out["name"], tuple(want))


def _thresholds(sec: dict, where: str) -> Thresholds:
    values: dict[str, Any] = {}
    for key, upper in (("image", 10.0), ("pixel", 10.0), ("raw_image", None), ("raw_pixel", None)):
        if key in sec:
            values[key] = check_threshold_value(sec[key], key, upper, where)
    formula = sec.get("formula")
    if formula is not None and not isinstance(formula, str):
        raise BundleError(f"{where}: threshold.formula must be text, got {formula!r}; {HINT}")
    rest = {k: v for k, v in sec.items() if k not in _THRESHOLD_KEYS}
    return Thresholds(formula=formula, calibration=_plain(rest), **values)


def _files(sec: dict, where: str) -> dict[str, FileEntry]:
    if MODEL_FP32 not in sec:
        raise BundleError(f"{where}: files lists no {MODEL_FP32}; {HINT}")
    files = {}
    for name, entry in sec.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise BundleError(f"{where}: files entry {name!r} is not a plain file name inside the bundle; {HINT}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int):
            raise BundleError(f"{where}: files.{name} needs a sha256 (text) and bytes (integer); {HINT}")
        precision = entry.get("precision")
        if precision is not None and not isinstance(precision, str):
            raise BundleError(f"{where}: files.{name}.precision must be text, got {precision!r}; {HINT}")
        files[name] = FileEntry(entry["sha256"], entry["bytes"], precision)
    return files


def finite_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_threshold_value(value: object, key: str, upper: float | None, where: str) -> float:
    """A threshold of the manifest: normalised (``upper`` 10) or raw (> 0); BundleError naming it."""
    note = (" (normalised units: the calibrated threshold is 0.5)" if upper is not None
            else " (the calibrated raw score)" if key == "raw_image" else " (the calibrated raw map value)")
    try:
        return check_threshold(value, f"threshold.{key}", upper=upper)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}{note}; fix the manifest or {HINT}") from None

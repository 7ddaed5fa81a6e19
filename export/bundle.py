"""The bundle: a folder with ``manifest.json`` and the ONNX model(s) that ``haloae-export`` writes.

Standard library only (json, hashlib, pathlib): the edge daemon imports this module on a Jetson
without torch or onnx. The format is documented in ``docs/bundle.md``; ``verify_bundle`` is what
``haloae-export --verify`` and the daemon run before loading a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from haloae.errors import UserError
from haloae.validate import check_threshold, strict_json

log = logging.getLogger(__name__)

FORMAT = "haloae-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FP32 = "model.onnx"
MODEL_FP16 = "model.fp16.onnx"
NORMALISATION_FORMULA = (
    "score = 0.5 * score_raw / raw_image; anomaly_map = 0.5 * map_raw / raw_pixel "
    "(the calibrated thresholds map to 0.5)"
)
_REQUIRED = ("input", "outputs", "threshold", "files", "model")
_HINT = "re-export it with `haloae-export CHECKPOINT --out DIR`"


class BundleError(UserError, ValueError):
    """A bundle is missing, incomplete, tampered with or of an unknown version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, precision: str) -> dict[str, Any]:
    """The ``files`` entry of one bundle file."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "precision": precision}


def make_manifest(
    *,
    input_name: str,
    input_shape: list[int],
    mean: list[float],
    std: list[float],
    output_names: dict[str, str],
    threshold: dict[str, Any],
    files: dict[str, dict[str, Any]],
    model: dict[str, Any],
    parity: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a version-1 manifest (see docs/bundle.md for every field)."""
    n, _, h, w = input_shape
    return {
        "format": FORMAT,
        "version": VERSION,
        "input": {
            "name": input_name,
            "shape": list(input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "color": "RGB",
            "scale": 1.0 / 255.0,
            "mean": list(mean),
            "std": list(std),
            "normalization": "in-graph",
            "resize": "INTER_AREA",
        },
        "outputs": {
            "score": {"name": output_names["score"], "shape": [n]},
            "anomaly_map": {"name": output_names["anomaly_map"], "shape": [n, 1, h, w]},
        },
        "threshold": {"image": 0.5, "pixel": 0.5, "formula": NORMALISATION_FORMULA, **threshold},
        "files": files,
        "model": model,
        "parity": parity,
    }


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (sorted keys, indented) and return its path."""
    path = Path(bundle_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_manifest(bundle_dir: Path) -> dict[str, Any]:
    """Read and structurally check ``manifest.json`` (no file hashes; see ``verify_bundle``)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist: pass the folder that "
                          f"`haloae-export --out` wrote, or {_HINT}")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a complete bundle; {_HINT}")
    try:
        manifest = strict_json(path.read_bytes().decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path} is not UTF-8 text (byte {exc.start}); {_HINT}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {_HINT}") from None
    except ValueError as exc:  # a duplicate key, NaN or Infinity
        raise BundleError(f"{exc}; {_HINT}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}; check its permissions") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a HaloAE bundle manifest (format must be "
                          f"'{FORMAT}'); {_HINT}")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{path} has manifest version {manifest.get('version')!r}, this haloae "
                          f"reads version {VERSION}: {_HINT} using this haloae version")
    missing = [k for k in _REQUIRED if not isinstance(manifest.get(k), dict)]
    if missing:
        raise BundleError(f"{path} lacks the section(s) {', '.join(missing)}; {_HINT}")
    _check_shapes(manifest, path)
    _check_names(manifest, path)
    _check_thresholds(manifest, path)
    return manifest


def _check_shapes(manifest: dict[str, Any], path: Path) -> None:
    inp, outs = manifest["input"], manifest["outputs"]
    shape = inp.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d > 0
                                                              for d in shape) and shape[1] == 3):
        raise BundleError(f"{path}: input.shape must be [N, 3, H, W] positive integers, got "
                          f"{shape!r}; {_HINT}")
    n, _, h, w = shape
    expected = {"score": [n], "anomaly_map": [n, 1, h, w]}
    for key, want in expected.items():
        out = outs.get(key)
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise BundleError(f"{path}: outputs.{key}.name is missing; {_HINT}")
        if out.get("shape") != want:
            raise BundleError(f"{path}: outputs.{key}.shape is {out.get('shape')!r} but the input "
                              f"shape {shape} implies {want}; {_HINT}")
    if MODEL_FP32 not in manifest["files"]:
        raise BundleError(f"{path}: files lists no {MODEL_FP32}; {_HINT}")


def _check_names(manifest: dict[str, Any], path: Path) -> None:
    """Tensor names the backends bind, and file names that stay inside the bundle folder."""
    names = [manifest["input"].get("name"), manifest["outputs"]["score"]["name"],
             manifest["outputs"]["anomaly_map"]["name"]]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != 3:
        raise BundleError(f"{path}: input.name, outputs.score.name and outputs.anomaly_map.name must be "
                          f"three different non-empty names, got {names!r}; {_HINT}")
    for name, entry in manifest["files"].items():
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise BundleError(f"{path}: files entry {name!r} is not a plain file name inside the bundle; {_HINT}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int):
            raise BundleError(f"{path}: files.{name} needs a sha256 (text) and bytes (integer); {_HINT}")


def _check_thresholds(manifest: dict[str, Any], path: Path) -> None:
    """``threshold.image`` / ``.pixel`` (normalised, what the daemon compares with) finite in
    (0, 10]; the raw calibration values, when present, finite and > 0."""
    thr = manifest["threshold"]
    for key, upper, note in (("image", 10.0, " (normalised units: the calibrated threshold is 0.5)"),
                             ("pixel", 10.0, " (normalised units: the calibrated threshold is 0.5)"),
                             ("raw_image", None, " (the calibrated raw score)"),
                             ("raw_pixel", None, " (the calibrated raw map value)")):
        if key in thr:
            try:
                check_threshold(thr[key], f"threshold.{key}", upper=upper)
            except ValueError as exc:
                raise BundleError(f"{path}: {exc}{note}; fix the manifest or {_HINT}") from None


def verify_bundle(bundle_dir: Path, check_onnx: bool = False) -> dict[str, Any]:
    """Check a bundle before use and return its manifest; raise ``BundleError`` if anything is off.

    Checks the manifest (format, version, sections, shapes), that every listed file exists with
    the recorded size and sha256, and with ``check_onnx`` (needs the ``onnx`` package) that each
    ONNX file's input/output names and shapes match the manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    for name, entry in manifest["files"].items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path} is listed in the manifest but missing: copy the whole "
                              f"bundle folder, or {_HINT}")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{path} does not match its sha256 in the manifest (modified or "
                              f"truncated after export): copy it again, or {_HINT}")
    if check_onnx:
        for name in manifest["files"]:
            if name.endswith(".onnx"):
                _check_onnx_io(bundle_dir / name, manifest)
    log.debug("bundle %s verified (%d files)", bundle_dir, len(manifest["files"]))
    return manifest


def _onnx_io(path: Path) -> dict[str, tuple[str, list]]:
    try:
        import onnx
    except ImportError:
        raise BundleError("checking the ONNX graph needs the onnx package: pip install onnx "
                          "(or verify without the graph check)") from None
    model = onnx.load(str(path), load_external_data=False)
    io = {}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                    for d in v.type.tensor_type.shape.dim]
            io[v.name] = (kind, dims)
    return io


def _check_onnx_io(path: Path, manifest: dict[str, Any]) -> None:
    io = _onnx_io(path)
    wanted = [("input", manifest["input"]["name"], manifest["input"]["shape"])]
    wanted += [("output", o["name"], o["shape"]) for o in manifest["outputs"].values()]
    for kind, name, shape in wanted:
        if name not in io or io[name][0] != kind:
            raise BundleError(f"{path} has no graph {kind} named {name!r} (the manifest says so; "
                              f"the graph has {sorted(io)}); {_HINT}")
        if io[name][1] != shape:
            raise BundleError(f"{path}: graph {kind} {name!r} has shape {io[name][1]} but the "
                              f"manifest says {shape}; {_HINT}")


def bundle_hash(bundle_dir: Path, manifest: dict[str, Any] | None = None) -> str:
    """Hash identifying the bundle's model files (sha256 of the sorted name/sha256 pairs).

    Thresholds and descriptions in the manifest do not change it, so editing a threshold does
    not invalidate cached TensorRT engines.
    """
    manifest = manifest if manifest is not None else load_manifest(bundle_dir)
    pairs = sorted((name, e.get("sha256", "")) for name, e in manifest["files"].items()
                   if name.endswith(".onnx"))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def model_file(bundle_dir: Path, manifest: dict[str, Any], precision: str = "fp32") -> Path:
    """Path of the ONNX file for ``precision`` ("fp32" or "fp16"; fp16 falls back to fp32)."""
    if precision not in ("fp32", "fp16"):
        raise BundleError(f"unknown precision {precision!r}: use fp32 or fp16")
    name = MODEL_FP16 if precision == "fp16" and MODEL_FP16 in manifest["files"] else MODEL_FP32
    return Path(bundle_dir) / name

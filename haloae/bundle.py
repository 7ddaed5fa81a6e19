"""The bundle folder: ``manifest.json`` plus the ONNX model(s) that ``haloae-export`` writes (core).

Standard library only (json, hashlib, pathlib): the edge daemon imports this on a Jetson without
torch or onnx. The manifest itself is :mod:`haloae.manifest`; this module checks the files it
lists. :func:`verify_bundle` (or :meth:`Bundle.open`) is what ``haloae-export --verify``, the
daemon, ``haloae-eval --bundle`` and the benchmarks run before loading a model. docs/bundle.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import HINT, MANIFEST, MODEL_FP16, MODEL_FP32, BundleError, Manifest, read_manifest

log = logging.getLogger(__name__)

__all__ = ["Bundle", "BundleError", "MANIFEST", "MODEL_FP16", "MODEL_FP32", "bundle_hash", "file_entry",
           "model_file", "sha256_file", "verify_bundle"]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder and its manifest (what ``haloae.runtime.load_backend`` runs)."""

    dir: Path
    manifest: Manifest

    @classmethod
    def open(cls, bundle_dir: Path, check_onnx: bool = False) -> "Bundle":
        """Verify ``bundle_dir`` (manifest, sizes and sha256 of every file) and open it."""
        return cls(Path(bundle_dir), verify_bundle(bundle_dir, check_onnx))

    @property
    def hash(self) -> str:
        return bundle_hash(self.manifest)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id(self.hash)

    def model_file(self, precision: str = "fp32") -> Path:
        return model_file(self.dir, self.manifest, precision)


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


def verify_bundle(bundle_dir: Path, check_onnx: bool = False) -> Manifest:
    """Check a bundle before use and return its manifest; raise ``BundleError`` if anything is off.

    Checks the manifest (format, version, sections, shapes, thresholds), that every listed file
    exists with the recorded size and sha256, and with ``check_onnx`` (needs the ``onnx`` package)
    that each ONNX file's input/output names and shapes match the manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name, entry in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path} is listed in the manifest but missing: copy the whole "
                              f"bundle folder, or {HINT}")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise BundleError(f"{path} does not match its sha256 in the manifest (modified or "
                              f"truncated after export): copy it again, or {HINT}")
    if check_onnx:
        for name in manifest.files:
            if name.endswith(".onnx"):
                _check_onnx_io(bundle_dir / name, manifest)
    log.debug("bundle %s verified (%d files)", bundle_dir, len(manifest.files))
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


def _check_onnx_io(path: Path, manifest: Manifest) -> None:
    io = _onnx_io(path)
    wanted = [("input", manifest.input.name, list(manifest.input.shape))]
    wanted += [("output", o.name, list(o.shape)) for o in (manifest.score, manifest.anomaly_map)]
    for kind, name, shape in wanted:
        if name not in io or io[name][0] != kind:
            raise BundleError(f"{path} has no graph {kind} named {name!r} (the manifest says so; "
                              f"the graph has {sorted(io)}); {HINT}")
        if io[name][1] != shape:
            raise BundleError(f"{path}: graph {kind} {name!r} has shape {io[name][1]} but the "
                              f"manifest says {shape}; {HINT}")


def bundle_hash(manifest: Manifest) -> str:
    """Hash identifying the bundle's model files (sha256 of the sorted name/sha256 pairs).

    Thresholds and descriptions in the manifest do not change it, so editing a threshold does
    not invalidate cached TensorRT engines.
    """
    pairs = sorted((name, e.sha256) for name, e in manifest.files.items() if name.endswith(".onnx"))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def model_file(bundle_dir: Path, manifest: Manifest, precision: str = "fp32") -> Path:
    """Path of the ONNX file for ``precision`` ("fp32" or "fp16"; fp16 falls back to fp32)."""
    return Path(bundle_dir) / manifest.model_file(precision)

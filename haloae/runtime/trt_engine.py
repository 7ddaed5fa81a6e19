"""TensorRT engine build and the on-device engine cache (``import tensorrt`` happens lazily).

Engines are specific to the GPU and the TensorRT version, so they are built on the target (by
``haloae-export --engine`` there, or by the edge daemon at first start through
``get_or_build_engine``) and cached under a key = sha256(bundle hash + TensorRT version + GPU name +
precision). Each engine has a JSON sidecar (TensorRT version, GPU, precision, bundle hash, engine
sha256, creation time); a cached engine is reused only if its sidecar matches and TensorRT can
deserialize it, and rebuilt otherwise.

The build uses the Python API common to TensorRT 8.5-10.x: Builder, create_network (with the
EXPLICIT_BATCH flag before 10.0, which made it the default and deprecated the flag), OnnxParser,
``set_memory_pool_limit(WORKSPACE)``, a timing cache kept on disk, ``BuilderFlag.FP16`` for fp16,
``build_serialized_network``.

Importable without tensorrt, torch or onnx: the edge daemon imports it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from haloae.errors import Failure
from haloae import bundle as bundle_mod

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
UNAVAILABLE_HINT = (
    "build the engine on the target with `haloae-export --engine BUNDLE_DIR` or let haloae-edge "
    "build it at first start; the ONNX files are in the bundle")


class TensorRTUnavailable(Failure, RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine."""


class EngineError(Failure, RuntimeError):
    """The engine build failed (the message carries the parser/builder errors)."""


@dataclass
class EngineMeta:
    """Sidecar metadata written next to each engine (``<key>.json``)."""

    tensorrt_version: str
    gpu_name: str
    precision: str
    bundle_hash: str
    onnx_file: str
    engine_sha256: str
    created: str
    key: str


def import_tensorrt():
    """``import tensorrt`` or raise ``TensorRTUnavailable`` with what to do."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: libnvinfer / CUDA libraries missing
        raise TensorRTUnavailable(
            f"TensorRT is not installed / no GPU: {UNAVAILABLE_HINT}") from None
    return tensorrt


def default_cache_dir() -> Path:
    """``$HALOAE_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/haloae/engines`` (``~/.cache/...``)."""
    if os.environ.get("HALOAE_ENGINE_CACHE"):
        return Path(os.environ["HALOAE_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "haloae" / "engines"


def gpu_name() -> str:
    """CUDA device 0's name (cuda-python, pycuda, Jetson device tree), else 'unknown'."""
    for probe in (_gpu_name_cuda_python, _gpu_name_pycuda, _gpu_name_jetson):
        try:
            name = probe()
        except Exception as exc:  # noqa: BLE001 - any probe failure just means "try the next one"
            log.debug("GPU name probe %s failed: %s", probe.__name__, exc)
            continue
        if name:
            return name
    return "unknown"


def _gpu_name_cuda_python() -> str | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).strip("\0 ")


def _gpu_name_pycuda() -> str | None:
    import pycuda.driver as drv

    drv.init()
    return drv.Device(0).name()


def _gpu_name_jetson() -> str | None:
    model = Path("/proc/device-tree/model")
    return model.read_text(errors="replace").strip("\0 \n") if model.is_file() else None


def cache_key(bundle_hash: str, tensorrt_version: str, gpu: str, precision: str) -> str:
    """sha256 of the four things an engine depends on."""
    text = f"{bundle_hash}|{tensorrt_version}|{gpu}|{precision}"
    return hashlib.sha256(text.encode()).hexdigest()


def engine_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """``(engine, sidecar)`` paths of a cache entry."""
    return Path(cache_dir) / f"{key}.engine", Path(cache_dir) / f"{key}.json"


def write_metadata(path: Path, meta: EngineMeta) -> None:
    _atomic_write(Path(path), (json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n").encode())


def read_metadata(path: Path) -> EngineMeta:
    """Read a sidecar; ``EngineError`` if it is missing, not JSON or lacks fields."""
    try:
        data = json.loads(Path(path).read_text())
        return EngineMeta(**data)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise EngineError(
            f"engine metadata {path} is unreadable ({exc}): delete it to rebuild") from None


def metadata_mismatches(meta: EngineMeta, expected: dict[str, str], engine_path: Path) -> list[str]:
    """Fields of ``meta`` that differ from ``expected`` and a changed/missing engine file."""
    problems = [f"{k}: cached {getattr(meta, k)!r} != {v!r}"
                for k, v in expected.items() if getattr(meta, k) != v]
    if not Path(engine_path).is_file():
        problems.append("engine file missing")
    elif bundle_mod.sha256_file(engine_path) != meta.engine_sha256:
        problems.append("engine file does not match its recorded sha256")
    return problems


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def build_engine(onnx_path: Path, precision: str, timing_cache: Path | None = None,
                 workspace_mb: int = 1024, trt: Any = None) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine; the timing cache is read and updated."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001 - TensorRT raises plain RuntimeError/TypeError w/o GPU
        raise TensorRTUnavailable(f"TensorRT cannot start a builder ({exc}); is a CUDA GPU "
                                  f"visible? {UNAVAILABLE_HINT}") from None
    if builder is None:
        raise TensorRTUnavailable(
            f"TensorRT could not create a builder (no CUDA GPU?): {UNAVAILABLE_HINT}")
    flags = 0
    if _major(trt.__version__) < 10:  # 10.x: explicit batch is the only mode, flag deprecated
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16":
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast fp16; the fp16 engine may be slow")
        config.set_flag(trt.BuilderFlag.FP16)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see its log "
                          f"above); try a larger workspace or fp32")
    if timing_cache is not None:
        _atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def _deserializes(trt: Any, engine_path: Path) -> bool:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    return runtime.deserialize_cuda_engine(Path(engine_path).read_bytes()) is not None


def get_or_build_engine(bundle: bundle_mod.Bundle | Path, cache_dir: Path | None = None, precision: str = "fp16",
                        workspace_mb: int = 1024, trt: Any = None) -> Path:
    """Path of a TensorRT engine for the bundle on this GPU: the cached one if valid, else built.

    ``bundle``: an opened :class:`~haloae.bundle.Bundle` (already verified: its files are not
    hashed again) or a bundle folder (verified here).

    What the edge daemon calls at first start. Raises ``TensorRTUnavailable`` without TensorRT /
    GPU, ``BundleError`` for a bad bundle and ``EngineError`` when the build fails.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(bundle, bundle_mod.Bundle):
        bundle = bundle_mod.Bundle.open(Path(bundle))
    manifest = bundle.manifest
    trt = trt or import_tensorrt()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    expected = {"tensorrt_version": str(trt.__version__), "gpu_name": gpu_name(),
                "precision": precision, "bundle_hash": bundle_mod.bundle_hash(manifest)}
    key = cache_key(expected["bundle_hash"], expected["tensorrt_version"], expected["gpu_name"],
                    precision)
    engine_path, meta_path = engine_paths(cache_dir, key)
    if meta_path.is_file():
        try:
            problems = metadata_mismatches(read_metadata(meta_path), expected, engine_path)
        except EngineError as exc:
            problems = [str(exc)]
        if not problems and _deserializes(trt, engine_path):
            log.info("reusing cached TensorRT engine %s", engine_path)
            return engine_path
        log.warning("cached engine %s is stale (%s): rebuilding", engine_path,
                    "; ".join(problems) or "TensorRT cannot deserialize it")
    onnx_path = bundle.model_file(precision)
    timing_id = cache_key("", expected["tensorrt_version"], expected["gpu_name"], "")[:16]
    timing = cache_dir / f"timing-{timing_id}.cache"  # shared by all bundles on this GPU + TRT
    log.info("building a %s TensorRT engine from %s (minutes on a Jetson)", precision, onnx_path)
    data = build_engine(onnx_path, precision, timing_cache=timing, workspace_mb=workspace_mb,
                        trt=trt)
    _atomic_write(engine_path, data)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = EngineMeta(onnx_file=onnx_path.name, created=created, key=key,
                      engine_sha256=hashlib.sha256(data).hexdigest(), **expected)
    write_metadata(meta_path, meta)
    log.info("engine written to %s", engine_path)
    return engine_path

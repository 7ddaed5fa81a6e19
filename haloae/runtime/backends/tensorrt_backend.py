"""TensorRT backend (priority 30): a cached engine built on this GPU from the bundle's ONNX.

Everything is imported lazily, when the backend is built. The engine comes from
``haloae.runtime.trt_engine.get_or_build_engine`` (the engine builder, which needs only tensorrt
and the standard library) (cache keyed by bundle
hash, TensorRT version, GPU name and precision; built at first start). Execution uses the API
common to TensorRT 8.5-10.x: ``deserialize_cuda_engine``, ``create_execution_context``, I/O
tensors by name (``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode``),
``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream.

Device memory and copies go through cuda-python (``cuda.bindings.runtime`` or the older
``cuda.cudart``), imported here lazily; the edge never needs torch for TensorRT.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from haloae.bundle import Bundle

from ..base import Backend, BackendUnavailable, RuntimeOptions
from ..registry import register

log = logging.getLogger(__name__)


class CudartMemory:
    """Device buffers, copies and a stream through cuda-python's runtime API."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # cuda-python < 12.6
            except ImportError:
                raise BackendUnavailable("cuda-python is not installed (pip install cuda-python)") from None
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())

    def _ok(self, result: tuple) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, shape: tuple, dtype: np.dtype) -> tuple[int, int]:
        """``(handle, device pointer)``; here both are the pointer."""
        ptr = int(self._ok(self.rt.cudaMalloc(int(np.prod(shape)) * np.dtype(dtype).itemsize)))
        return ptr, ptr

    def htod(self, handle: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(handle, host.ctypes.data, host.nbytes, kind, self.stream))

    def dtoh(self, host: np.ndarray, handle: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, handle, host.nbytes, kind, self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    def free(self, handle: int) -> None:
        self.rt.cudaFree(handle)


def cuda_memory():
    """Device memory and a stream through cuda-python (``pip install cuda-python``); the edge
    side never imports torch outside the torch backend. ``BackendUnavailable`` if missing."""
    return CudartMemory()


@register("tensorrt", priority=30)
class TensorRTBackend(Backend):
    """Runs a TensorRT engine; ``trt``, ``memory`` and ``engine_path`` can be injected (tests)."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions = RuntimeOptions(),
                 trt: Any = None, memory: Any = None, engine_path: Path | None = None):
        from haloae.runtime import trt_engine  # the builder; imports tensorrt only when called

        manifest, precision = bundle.manifest, options.precision

        if trt is None:
            try:
                trt = trt_engine.import_tensorrt()
            except trt_engine.TensorRTUnavailable:
                raise BackendUnavailable("tensorrt not installed (pip install tensorrt, or JetPack's "
                                         "python3-libnvinfer)") from None
        self.trt = trt
        self.memory = memory or cuda_memory()
        if engine_path is None:
            try:
                engine_path = trt_engine.get_or_build_engine(bundle, options.engine_dir, precision, trt=trt)
            except trt_engine.TensorRTUnavailable as exc:
                raise BackendUnavailable(str(exc)) from None
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT cannot deserialize {engine_path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.input_shape = tuple(manifest.input.shape)
        self.input_name = manifest.input.name
        self.output_names = (manifest.score.name, manifest.anomaly_map.name)
        self._bind(engine_path)
        self.device = f"{precision} engine {Path(engine_path).name[:12]}"
        log.info("tensorrt %s: engine %s", getattr(trt, "__version__", "?"), engine_path)

    def _bind(self, engine_path: Path) -> None:
        trt, eng = self.trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [self.input_name] or set(self.output_names) - set(names):
            raise BackendUnavailable(f"engine {engine_path} has tensors {names}, the manifest expects input "
                                     f"{self.input_name} and outputs {list(self.output_names)}; delete it to rebuild")
        self.context.set_input_shape(self.input_name, self.input_shape)
        self.buffers, self.host = {}, {}
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(n)))
            handle, ptr = self.memory.alloc(shape, dtype)
            self.buffers[n] = handle
            self.context.set_tensor_address(n, ptr)
            if n != self.input_name:
                self.host[n] = np.empty(shape, dtype)
        self.input_dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(self.input_name)))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(self.check_batch(batch), dtype=self.input_dtype)
        self.memory.htod(self.buffers[self.input_name], x)
        if not self.context.execute_async_v3(self.memory.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        for n, host in self.host.items():
            self.memory.dtoh(host, self.buffers[n])
        self.memory.synchronize()
        score, amap = (self.host[n].astype(np.float32) for n in self.output_names)  # copies
        n = self.input_shape[0]
        return score.reshape(n), amap.reshape(n, 1, *self.input_shape[2:])

    def close(self) -> None:
        for handle in getattr(self, "buffers", {}).values():
            self.memory.free(handle)
        self.buffers = {}
        self.context = self.engine = self.runtime = None

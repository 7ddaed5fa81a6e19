"""Importing the daemon and the runtime loads no torch, onnx, onnxruntime or tensorrt (a Jetson may
lack them): the backends import their library only when built."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "haloae.train", "haloae.export")


def test_daemon_import_loads_no_heavy_module():
    code = ("import sys\n"
            "import haloae.edge.app, haloae.edge.__main__, haloae.edge.publish, haloae.edge.infer\n"
            "import haloae.edge.capture, haloae.runtime, haloae.bundle, haloae.preprocess, haloae.synthetic\n"
            "assert haloae.runtime.choices()[0] == 'auto'  # every backend module registered\n"
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(','.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing the daemon loaded {proc.stdout.strip()}"


def test_edge_and_runtime_sources_import_no_heavy_module_at_module_level():
    """Static check: no edge or runtime module imports torch / onnx / tensorrt / a training or export
    module at module level (the runtime backends import theirs inside ``__init__``)."""
    from pathlib import Path

    import haloae.edge as edge
    import haloae.runtime as runtime

    for root in (Path(edge.__file__).parent, Path(runtime.__file__).parent):
        for path in sorted(root.rglob("*.py")):
            for line in path.read_text().splitlines():
                if line.startswith(("import ", "from ")):
                    mod = line.split()[1]
                    assert not mod.startswith(("torch", "onnx", "tensorrt", "haloae.train", "haloae.export")), \
                        f"{path.name}: {line}"

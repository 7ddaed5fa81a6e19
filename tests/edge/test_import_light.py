"""Importing the daemon loads no torch, onnx, onnxruntime or tensorrt (a Jetson may lack them)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "haloae.train")


def test_daemon_import_loads_no_heavy_module():
    code = ("import sys\n"
            "import haloae.edge.app, haloae.edge.__main__, haloae.edge.publish, haloae.edge.infer\n"
            "import haloae.edge.capture, haloae.edge.backends.select\n"
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(','.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing the daemon loaded {proc.stdout.strip()}"


def test_edge_sources_import_torch_only_in_the_torch_backend():
    """Static check: no edge module imports torch / onnx / haloae.train at module level."""
    from pathlib import Path

    import haloae.edge as edge

    root = Path(edge.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                mod = line.split()[1]
                assert not mod.startswith(("torch", "onnx", "tensorrt", "haloae.train")), f"{path.name}: {line}"

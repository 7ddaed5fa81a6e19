"""Layer rules, checked on the source (an import-linter equivalent over ``ast``).

``haloae`` core (``haloae/*.py``, ``haloae/runtime/``) imports no stage; ``edge`` imports
neither ``train`` nor ``export`` nor torch; ``train`` and ``export`` do not import ``edge``. The
exceptions: the torch backend (``haloae/runtime/backends/torch_backend.py``) runs a training
checkpoint, so it imports torch and the model code; the orchestrators ``haloae/demo.py`` and
``haloae/readme_image.py`` drive every stage, and no module imports them. Every import counts: module level, inside functions (lazy), under
``TYPE_CHECKING``, relative (``from ..train import x``) and ``importlib.import_module("...")``
with a literal name. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package it is installed as (pyproject.toml [tool.setuptools] package-dir)
PACKAGES = {"haloae": "haloae", "train": "haloae.train", "export": "haloae.export", "edge": "haloae.edge"}
STAGES = ("haloae.train", "haloae.export", "haloae.edge")


def module_name(path: Path) -> str:
    """The dotted name ``path`` (relative to the repository) is imported as."""
    parts = list(path.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source`` of the module ``module``.
    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Rule:
    name: str
    globs: tuple[str, ...]  # source files the rule covers, relative to the repository
    forbidden: tuple[str, ...]  # module prefixes they must not import
    allowed: tuple[tuple[str, str], ...] = ()  # (file glob, module prefix) exceptions

    def files(self) -> list[Path]:
        return sorted({p.relative_to(REPO) for g in self.globs for p in REPO.glob(g)})

    def violations(self) -> list[str]:
        out = []
        for rel in self.files():
            module = module_name(rel)
            for line, name in imports((REPO / rel).read_text(encoding="utf-8"), module, rel.name == "__init__.py"):
                bad = next((f for f in self.forbidden if _within(name, f)), None)
                if bad is None or any(rel.match(g) and _within(name, m) for g, m in self.allowed):
                    continue
                entry = f"{rel}:{line} imports {name}"
                if entry not in out and not any(o.startswith(f"{rel}:{line} imports ") and _within(name, o.split()[-1])
                                                for o in out):
                    out.append(entry)
        return out


# the torch backend runs a training checkpoint: it alone may import torch and the model code
TORCH_BACKENDS = tuple((f, m) for f in ("haloae/runtime/backends/torch_backend.py",)
                       for m in ("torch", "haloae.train"))
# the orchestrators run the whole pipeline (the demo trains, exports and starts the daemon)
ORCHESTRATORS = tuple((f, m) for f in ("haloae/demo.py", "haloae/readme_image.py") for m in STAGES)
RULES = {
    "core imports no stage": Rule("core", ("haloae/*.py", "haloae/runtime/**/*.py"), STAGES,
                                  TORCH_BACKENDS + ORCHESTRATORS),
    "edge imports neither train nor export nor torch (outside the torch backend)": Rule(
        "edge", ("edge/**/*.py",), ("haloae.train", "haloae.export", "torch"), TORCH_BACKENDS),
    "train does not import edge": Rule("train", ("train/**/*.py",), ("haloae.edge",)),
    "export does not import edge": Rule("export", ("export/**/*.py",), ("haloae.edge",)),
}
# Every rule holds: a rule the tree breaks fails with its offenders listed.


@pytest.mark.parametrize("title", [pytest.param(t, id=RULES[t].name) for t in RULES])
def test_layer_rule(title):
    rule = RULES[title]
    assert rule.files(), f"rule {rule.name!r} covers no file: fix its globs"
    found = rule.violations()
    assert not found, f"layer rule broken: {title}:\n  " + "\n  ".join(found)


def test_the_checker_resolves_every_import_form():
    src = """
import torch.nn
from ..train import loop
from .. import export
from . import zones
from .sources import v4l2
import importlib
def lazy():
    from haloae.zones import load_zones
    importlib.import_module("haloae.train.cli")
"""
    names = {n for _, n in imports(src, "haloae.edge.config")}
    assert {"torch.nn", "haloae.train", "haloae.train.loop", "haloae.export", "haloae.zones",
            "haloae.edge.sources.v4l2", "haloae.zones.load_zones", "haloae.train.cli"} <= names
    assert {n for _, n in imports("from . import base", "haloae.edge.sources", is_package=True)} >= {
        "haloae.edge.sources.base"}
    assert module_name(Path("edge/sources/__init__.py")) == "haloae.edge.sources"
    assert module_name(Path("train/synth.py")) == "haloae.train.synth"

"""Named configs: the YAML files shipped inside the package (``haloae.configs``: the repository's
``configs/`` folder, installed as package data), found with `importlib.resources`.

So ``model: edge`` in a training config, ``haloae-train --config mtd-edge`` and the demo work
from any directory after ``pip install``, without a clone. A name is a file stem inside one kind
of config: ``model`` (``configs/model/*.yaml``), ``train`` (``configs/train/*.yaml``) or
``edge`` (``configs/edge/*.yaml``, examples to copy: ``haloae-config edge/one-camera``). A value
that names an existing file, or ends in ``.yaml`` / ``.yml``, is a path instead.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11

KINDS = ("model", "train", "edge")
PACKAGE = "haloae.configs"
UNITS = "haloae.systemd"  # the systemd unit files, shipped the same way
SUFFIXES = (".yaml", ".yml")


def root() -> Traversable:
    """The shipped ``configs/`` folder."""
    return files(PACKAGE)


def names(kind: str) -> list[str]:
    """Names of the shipped configs of one kind (``"model"``, ``"train"``, ``"edge"``)."""
    folder = root() / kind
    if not folder.is_dir():
        raise ValueError(f"no config kind {kind!r}: use one of {', '.join(KINDS)}")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.is_file() and p.name.endswith(".yaml"))


def all_names() -> list[str]:
    """Every shipped config as ``<kind>/<name>`` (and ``edge/zones/<name>``), then the systemd
    units as ``systemd/<file>``."""
    out = [f"{kind}/{name}" for kind in KINDS for name in names(kind)]
    zones = root() / "edge" / "zones"
    out += sorted(f"edge/zones/{p.name[:-5]}" for p in zones.iterdir() if p.name.endswith(".yaml"))
    out += sorted(f"systemd/{p.name}" for p in files(UNITS).iterdir() if p.name.endswith(".service"))
    return out


def find(kind: str, name: str) -> Optional[Traversable]:
    """The shipped config ``<kind>/<name>.yaml``, or None when there is none."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    entry = root() / kind / f"{name}.yaml"
    return entry if entry.is_file() else None


def is_path(value: Union[str, Path]) -> bool:
    """Whether ``value`` means a file (it exists, or has a YAML suffix or a folder in it) rather
    than a name."""
    text = str(value)
    return Path(text).is_file() or text.endswith(SUFFIXES) or "/" in text or "\\" in text


def resolve(kind: str, value: Union[str, Path]) -> Optional[Union[Path, Traversable]]:
    """A path (when ``value`` is one and the file exists) or the shipped config it names; None
    when neither exists."""
    if is_path(value):
        return Path(value) if Path(value).is_file() else None
    return find(kind, str(value))


def read_text(name: str) -> str:
    """The text of a shipped config given as ``<kind>/<name>`` (``edge/one-camera``) or of a
    unit file (``systemd/haloae-edge@.service``); KeyError when there is none."""
    if name.startswith("systemd/"):
        entry = files(UNITS) / name.removeprefix("systemd/")
        if "/" in name.removeprefix("systemd/") or not name.endswith(".service") or not entry.is_file():
            raise KeyError(name)
        return entry.read_text(encoding="utf-8")
    parts = name.removesuffix(".yaml").split("/")
    if len(parts) < 2 or parts[0] not in KINDS or any(not p or p.startswith(".") for p in parts):
        raise KeyError(name)
    entry = root().joinpath(*parts[:-1], parts[-1] + ".yaml")
    if not entry.is_file():
        raise KeyError(name)
    return entry.read_text(encoding="utf-8")

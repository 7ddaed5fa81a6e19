"""Reading a YAML file strictly: UTF-8 only, no duplicate keys, one document.

PyYAML's ``safe_load`` takes the last of two equal keys without a word and decodes whatever
bytes it gets; a config that says ``threshold`` twice, or one with a stray Latin-1 byte, must
be refused instead, with one line saying where. :func:`read_yaml` raises ``ValueError`` with
that line; each config loader (model, training run, edge daemon, ignore zones) turns it into
its ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in out
        except TypeError:  # an unhashable key (a list or a mapping as key)
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}",
                                                    key_node.start_mark) from None
        if duplicate:
            line = key_node.start_mark.line + 1
            raise ValueError(f"line {line}: the key {key!r} appears twice in the same mapping; keep one")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path | Traversable) -> object:
    """The YAML document in ``path`` (a file, or a packaged config from ``importlib.resources``);
    ValueError with one line for an unreadable, non-UTF-8, invalid or ambiguous file."""
    try:
        raw = (path if hasattr(path, "read_bytes") else Path(path)).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line}; save it as "
                         "UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config") from None

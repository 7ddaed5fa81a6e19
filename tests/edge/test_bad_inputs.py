"""The bad-input table of docs/operations.md ("Bad inputs and their refusals"), run as written.

Every row is one input a user can get wrong, where it enters (``config``: a key of the daemon's
YAML, value in YAML; ``config file``: the whole file, as Python bytes; ``manifest``: a key of the
bundle's manifest.json, value as JSON text written verbatim; ``manifest text``: JSON text put
right after the manifest's opening brace; ``outbox``: SQL run on a fresh ``outbox.sqlite``;
``outbox file``: its bytes; ``setting``: an MQTT ``set`` topic and payload) and the one line
that refuses it. ``…`` in a refusal stands for a part that varies (paths) or is cut short;
``{REPO}`` in a value is the repository's folder.

Config, manifest and outbox rows run ``haloae-edge --validate-config`` (manifest rows also
``haloae-export --verify``): exit code 2, exactly one line on stderr, no traceback, starting
with ``haloae-edge: <kind> error:`` and containing the refusal. Setting rows run the parser the
daemon runs on each message; its text is what ``<prefix>/error`` carries.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from toy_bundle import make_toy_bundle

from haloae.edge.__main__ import run as edge_run
from haloae.edge.settings import SettingError, parse_set
from haloae.export.cli import main as export_main

DOC = REPO / "docs" / "operations.md"
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"
KIND = {"config": "config", "config file": "config", "manifest": "bundle", "manifest text": "bundle",
        "outbox": "state", "outbox file": "state"}


def _cell(text: str) -> str:
    """A table cell without its code-span backticks (`` `x` `` or ``` `` x `` ```)."""
    text = text.strip()
    if text.startswith("``") and text.endswith("``") and len(text) >= 4:
        return text[2:-2].strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "`" else text


def table() -> list[tuple[str, str, str, str, str]]:
    """``(number, where, key, value, refusal)`` rows of the table in docs/operations.md."""
    doc = DOC.read_text()
    body = doc[doc.index(START) + len(START): doc.index(END)]
    rows = []
    for line in body.strip().splitlines()[2:]:  # header and separator first
        cells = [_cell(c) for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 5, f"docs/operations.md bad-input row needs 5 cells: {line}"
        rows.append(tuple(cells))
    return rows


ROWS = table()


def _bytes(text: str) -> bytes:
    m = re.fullmatch(r"(b\".*\") \* (\d+)", text)
    return ast.literal_eval(m.group(1)) * int(m.group(2)) if m else ast.literal_eval(text)


def _set(doc, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc.setdefault(p, {})
    last = parts[-1]
    if isinstance(doc, list):
        i = int(last)
        doc[i:i + 1] = [value]
    else:
        doc[last] = value


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("toy") / "bundle")


def _base(tmp_path: Path, bundle: Path) -> dict:
    return {"node": "line1", "state_dir": str(tmp_path / "state"),
            "cameras": [{"id": "cam0", "source": "synthetic"}],
            "model": {"bundle": str(bundle), "backend": "onnxruntime", "threads": 1},
            "publish": {"zmq_pub": None}}


def _validate(config: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = edge_run(["--config", str(config), "--validate-config"])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _contains_in_order(line: str, refusal: str) -> bool:
    pos = 0
    for part in refusal.split("…"):
        found = line.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def test_the_table_is_large_enough_and_the_base_config_is_valid(tmp_path, toy, capsys):
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump(_base(tmp_path, toy)))
    code, lines = _validate(config, capsys)
    assert code == 0 and lines == [], lines


@pytest.mark.parametrize("number, where, key, value, refusal", ROWS, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in ROWS])
def test_bad_input_is_refused_with_one_line(tmp_path, toy, capsys, number, where, key, value, refusal):
    if where == "setting":
        payload = _bytes(value)
        with pytest.raises(SettingError) as err:
            parse_set("haloae/line1", f"haloae/line1/{key}", ["cam0"], payload, len(payload))
        assert _contains_in_order(str(err.value), refusal), f"got: {err.value}"
        assert "\n" not in str(err.value)
        return
    base = _base(tmp_path, toy)
    config = tmp_path / "edge.yaml"
    if where == "config":
        _set(base, key, yaml.safe_load(value.replace("{REPO}", str(REPO))))
    bundle = toy
    if where.startswith("manifest"):
        bundle = tmp_path / "bundle"
        shutil.copytree(toy, bundle)
        base["model"]["bundle"] = str(bundle)
        manifest = bundle / "manifest.json"
        if where == "manifest":
            doc = json.loads(manifest.read_text())
            _set(doc, key, "@@RAW@@")
            manifest.write_text(json.dumps(doc).replace('"@@RAW@@"', value))
        else:
            manifest.write_text("{" + value + manifest.read_text().lstrip()[1:])
    if where.startswith("outbox"):
        (tmp_path / "state").mkdir()
        box = tmp_path / "state" / "outbox.sqlite"
        if where == "outbox":
            with sqlite3.connect(box) as db:
                db.executescript(value)
        else:
            box.write_bytes(_bytes(value))
    if where == "config file":
        config.write_bytes(_bytes(value))
    else:
        config.write_text(yaml.safe_dump(base, allow_unicode=True))
    code, lines = _validate(config, capsys)
    assert code == 2 and len(lines) == 1, (code, lines)
    line = lines[0]
    assert line.startswith(f"haloae-edge: {KIND[where]} error: ") and "Traceback" not in line, line
    assert _contains_in_order(line, refusal), f"got: {line}"
    if where.startswith("manifest"):  # the export tool refuses the same bundle the same way
        assert export_main(["--verify", str(bundle)]) == 2
        out = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(out) == 1 and out[0].startswith("haloae-export: error: "), out
        assert _contains_in_order(out[0], refusal.removeprefix("model.bundle: ")), out

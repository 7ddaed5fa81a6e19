"""Property-based tests (hypothesis) of everything that reads outside input: the daemon's config
loader, the bundle's manifest loader and the MQTT settings parser.

The property is the same for all three: any input is either refused with the loader's own
error (``ConfigError``, ``BundleError``, ``SettingError``: the CLI turns those into one line
and exit code 2) or accepted, and then every value the daemon relies on is valid (ids are one
topic level, thresholds finite in (0, 10], ranges ordered...). Never another exception, never
an accepted value that cannot work. Bounded to a few seconds each (about 30 s in all).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_bundle import make_toy_bundle

from haloae.edge.config import ConfigError, load_config
from haloae.edge.settings import SettingError, parse_set, parse_threshold
from haloae.manifest import BundleError, read_manifest
from haloae.validate import DECIMAL, IDENTIFIER, check_prefix, mqtt_text_problem

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="haloae-props-"))
TOY = make_toy_bundle(WORK / "bundle")

# values of every shape YAML / JSON can carry, the nasty ones included
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.sampled_from(["0,6", "1_0", ".inf", "cam0\n", "a/#", "5", "$SYS", ""]))
nasty = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=8)
# ... and values that look right, so that the accepted side of the property is exercised too
plausible = st.one_of(st.floats(0.001, 50), st.integers(0, 200), st.booleans(),
                      st.from_regex(r"\A[a-z0-9_-]{1,10}(/[a-z0-9_-]{1,8}){0,2}\Z"),
                      st.lists(st.integers(0, 300), min_size=4, max_size=4))
values = st.one_of(plausible, plausible, nasty)

CONFIG_KEYS = ["node", "state_dir", "cameras", "cameras.0", "cameras.0.id", "cameras.0.source", "cameras.0.kind",
               "cameras.0.fps", "cameras.0.roi", "cameras.0.threshold", "cameras.0.loop", "cameras.1",
               "model", "model.batch_size", "model.threads", "model.backend", "mqtt", "mqtt.host", "mqtt.port",
               "mqtt.prefix", "mqtt.client_id", "mqtt.username", "mqtt.keepalive", "mqtt.reconnect_min_s",
               "mqtt.reconnect_max_s", "mqtt.protocol", "publish.max_rate_hz", "publish.queue_size",
               "alarms.n", "alarms.m", "alarms.clear_frames", "alarms.update_interval_s", "evidence.dir",
               "evidence.quota_mb", "health.reopen_min_s", "health.reopen_max_s", "health.stale_after_s", "extra"]


def _base_config() -> dict:
    return {"node": "line1", "state_dir": str(WORK / "state"), "cameras": [{"id": "cam0", "source": "synthetic"}],
            "model": {"bundle": str(TOY), "backend": "onnxruntime", "threads": 1}, "publish": {"zmq_pub": None}}


def _put(doc, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        if isinstance(doc, list):
            if not (k.isdigit() and int(k) < len(doc)):
                return
            doc = doc[int(k)]
        elif isinstance(doc, dict):
            doc = doc.setdefault(k, {})
        else:
            return
    last = keys[-1]
    if isinstance(doc, list) and last.isdigit():
        if int(last) < len(doc):
            doc[int(last)] = value
        else:
            doc.append(value)
    elif isinstance(doc, dict):
        doc[last] = value


def _finite_floats(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_floats(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite_floats(v) for v in obj)
    return True


def _check_accepted_config(cfg) -> None:
    assert IDENTIFIER.fullmatch(cfg.node)
    ids = [c.id for c in cfg.cameras]
    assert ids and len(set(ids)) == len(ids) and all(IDENTIFIER.fullmatch(i) for i in ids)
    assert check_prefix(cfg.prefix) == cfg.prefix
    assert cfg.mqtt.client_id is None or mqtt_text_problem(cfg.mqtt.client_id) is None
    for cam in cfg.cameras:
        assert cam.threshold is None or (math.isfinite(cam.threshold) and 0 < cam.threshold <= 10)
        assert cam.fps is None or (math.isfinite(cam.fps) and cam.fps > 0)
        assert cam.roi is None or (len(cam.roi) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in cam.roi) and min(cam.roi[2:]) > 0)
        assert mqtt_text_problem(cam.source) is None
    assert cfg.mqtt.reconnect_min_s <= cfg.mqtt.reconnect_max_s and 1 <= cfg.mqtt.port <= 65535
    assert cfg.health.reopen_min_s <= cfg.health.reopen_max_s and cfg.alarms.n <= cfg.alarms.m
    assert _finite_floats(cfg.model_dump())


@FAST
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), values), min_size=1, max_size=3))
def test_config_loader_refuses_or_accepts_only_working_values(edits):
    doc = _base_config()
    for key, value in edits:
        _put(doc, key, value)
    path = WORK / "edge.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):
        return  # not representable as YAML text: nothing a user could write
    try:
        cfg = load_config(path, check=False)
    except ConfigError as err:
        assert str(err).strip(), "a refusal says why"
        return
    _check_accepted_config(cfg)


@FAST
@given(st.binary(max_size=400))
def test_config_loader_on_arbitrary_bytes_only_raises_config_errors(data):
    path = WORK / "raw.yaml"
    path.write_bytes(b"node: line1\ncameras: [{id: cam0, source: synthetic}]\nmodel: {bundle: /b}\n" + data)
    try:
        cfg = load_config(path, check=False)
    except ConfigError:
        return
    _check_accepted_config(cfg)


MANIFEST_KEYS = ["threshold.image", "threshold.pixel", "threshold.raw_image", "threshold.raw_pixel", "threshold",
                 "input.shape", "input.name", "outputs.score.name", "outputs.score.shape", "outputs.anomaly_map",
                 "outputs.anomaly_map.shape", "files", "version", "format", "model"]


@FAST
@given(st.lists(st.tuples(st.sampled_from(MANIFEST_KEYS), values), min_size=1, max_size=3))
def test_manifest_loader_refuses_or_accepts_only_working_values(edits):
    doc = json.loads((TOY / "manifest.json").read_text())
    for key, value in edits:
        _put(doc, key, value)
    bundle = WORK / "mbundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps(doc))  # NaN / Infinity written as JSON would not be
    try:
        m = read_manifest(bundle).to_dict()
    except BundleError as err:
        assert str(err).strip()
        return
    thr = m["threshold"]
    for key in ("image", "pixel"):
        v = thr.get(key, 0.5)
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 10
    n, c, h, w = m["input"]["shape"]
    assert c == 3 and min(n, h, w) > 0
    assert m["outputs"]["score"]["shape"] == [n] and m["outputs"]["anomaly_map"]["shape"] == [n, 1, h, w]
    names = {m["input"]["name"], m["outputs"]["score"]["name"], m["outputs"]["anomaly_map"]["name"]}
    assert len(names) == 3 and all(isinstance(x, str) and x for x in names)


@FAST
@given(st.text(max_size=300))
def test_manifest_loader_on_arbitrary_text_only_raises_bundle_errors(text):
    bundle = WORK / "tbundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(text)
    try:
        read_manifest(bundle)
    except BundleError:
        return
    raise AssertionError("arbitrary text accepted as a manifest")


@FAST
@given(st.one_of(st.binary(max_size=300), st.text(max_size=40).map(str.encode),
                 st.from_regex(r"\A\s*[-+]?[0-9_]{0,4}[.,]?[0-9]{0,4}([eE][-+]?[0-9]{1,3})?\s*\Z").map(str.encode)))
def test_settings_parser_accepts_only_plain_decimals_in_range(payload):
    try:
        value = parse_threshold(payload)
    except SettingError as err:
        assert "\n" not in str(err)
        return
    text = payload.strip(b" \t\r\n").decode("ascii")
    assert DECIMAL.fullmatch(text) and value == float(text)
    assert math.isfinite(value) and 0 < value <= 10


@FAST
@given(st.from_regex(r"\A[0-9]{1,2}(\.[0-9]{1,6})?\Z"))
def test_settings_parser_takes_every_plain_decimal_in_range(text):
    value = float(text)
    if 0 < value <= 10:
        assert parse_threshold(text.encode()) == value
        assert parse_set("p", "p/cam0/threshold/set", ["cam0"], text.encode(), len(text)) == ("cam0", "threshold", value)

"""The edge daemon's configuration: a pydantic schema that forbids unknown keys.

``load_config(path)`` reads the YAML, validates it and resolves relative paths against the
YAML file's folder (state paths against ``state_dir``). Errors raise :class:`ConfigError`
whose message names the key path (``cameras.0.source: ...``); the CLI prints it on one line
and exits with :data:`EXIT_CONFIG` (= ``haloae.errors.EXIT_USER``, 2). Secrets never live in the YAML: the MQTT password comes
from an environment variable or from ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from haloae import runtime
from haloae.defect_mask import PEAK_FRACTION
from haloae.errors import EXIT_USER, UserError
from haloae.validate import check_client_id, check_identifier, check_prefix, mqtt_text_problem

from .config_base import Strict as _Strict
from .config_base import check_credential_name, check_env_name, format_error, secret
from .config_surface import DriftConfig, HomeAssistantConfig, HttpConfig, http_password_problem
from .sources import AnyCamera, kind_names, split_error_location, with_kind
from .sources import CameraConfig  # noqa: F401 - the base of every camera kind, for annotations
from haloae.yaml_file import read_yaml
from haloae.zones import ZonesError, load_zones

EXIT_CONFIG = EXIT_USER  # configuration errors exit 2 (systemd: RestartPreventExitStatus=2)
_HOST = re.compile(r"[A-Za-z0-9_.:\[\]%-]{1,253}")


class ConfigError(UserError, ValueError):
    """A configuration problem the user must fix; the message says where and what to do."""


def _ordered(low: float, high: float, low_name: str, high_name: str) -> None:
    if low > high:
        raise ValueError(f"{low_name} ({low:g}) must be <= {high_name} ({high:g})")


class ModelConfig(_Strict):
    bundle: Path = Field(strict=False, description="bundle folder written by haloae-export")
    backend: Literal[runtime.choices()] = Field(  # type: ignore[valid-type] - from the backend registry
        "auto", description="auto picks the first that loads, by priority: "
        f"{', '.join(runtime.choices()[1:])} (onnxruntime: CUDA, then CPU)")
    precision: Literal["fp32", "fp16"] = Field("fp32", description="which model file / engine precision to run")
    batch_size: int = Field(1, ge=1, description="frames per inference call, batched across cameras (<= the bundle's batch)")
    threads: int = Field(0, ge=0, description="CPU threads for inference (0 = all cores)")
    checkpoint: Path | None = Field(None, strict=False, description="torch backend only: the training checkpoint")


class TLSConfig(_Strict):
    ca: Path = Field(strict=False, description="CA certificate file that signed the broker's certificate")
    cert: Path | None = Field(None, strict=False, description="client certificate (mutual TLS)")
    key: Path | None = Field(None, strict=False, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip host-name verification (testing only)")


class MqttConfig(_Strict):
    host: str = Field("localhost", description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    client_id: str | None = Field(None, description="default: haloae-<node>")
    prefix: str | None = Field(None, description="topic prefix, default haloae/<node>")
    username: str | None = None
    password_env: str = Field("HALOAE_MQTT_PASSWORD", description="environment variable holding the password")
    password_credential: str = Field("mqtt_password", description="file name in $CREDENTIALS_DIRECTORY holding the password")
    tls: TLSConfig | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    qos_results: Literal[0, 1] = Field(0, description="QoS of result/mask messages (alarms are always QoS 1)")
    reconnect_min_s: float = Field(1.0, gt=0, le=3600, description="first reconnect delay (doubles up to reconnect_max_s)")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="longest reconnect delay; a connection lost "
                                   "after working is retried at least every 2 s for its first 5 minutes")

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        if _HOST.fullmatch(v) is None:
            raise ValueError(f"invalid broker host {v!r}: use a host name or an IP address (no spaces, no URL)")
        return v

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, v: str | None) -> str | None:
        return None if v is None else check_client_id(v)

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v: str | None) -> str | None:
        return None if v is None else check_prefix(v)

    @field_validator("username")
    @classmethod
    def _check_username(cls, v: str | None) -> str | None:
        problem = mqtt_text_problem(v) if v is not None else None
        if problem or v == "":
            raise ValueError(f"invalid user name {v!r}: {problem or 'it is empty'} (leave it out for no user)")
        return v

    @field_validator("password_env")
    @classmethod
    def _check_env(cls, v: str) -> str:
        return check_env_name(v)

    @field_validator("password_credential")
    @classmethod
    def _check_credential(cls, v: str) -> str:
        return check_credential_name(v, mqtt_text_problem(v))

    @model_validator(mode="after")
    def _backoff_order(self):
        _ordered(self.reconnect_min_s, self.reconnect_max_s, "reconnect_min_s", "reconnect_max_s")
        return self

    def password(self) -> str | None:
        """The password from the environment or the systemd credential; never from YAML."""
        return secret(self.password_env, self.password_credential)


class PublishConfig(_Strict):
    results: Literal["all", "anomalous", "none"] = Field("all", description="which frames get a result message")
    mask: bool = Field(True, description="publish the binary defect mask PNG with each published result")
    overlay: bool = Field(False, description="publish an overlay JPEG (heat map over the frame) of anomalous frames")
    max_rate_hz: float = Field(0, ge=0, description="per-camera cap on result messages per second (0 = none)")
    zmq_pub: str | None = Field("tcp://127.0.0.1:5560", description="local ZeroMQ PUB endpoint for results (null = off)")
    stats_interval_s: float = Field(10.0, gt=0, description="seconds between stats messages")
    queue_size: int = Field(32, ge=1, description="results waiting for the publisher's encoder thread; beyond it results "
                            "are dropped and counted (alarms are never dropped)")
    min_region_area: int = Field(4, ge=1, description="defect regions smaller than this many frame pixels are not reported")
    max_regions: int = Field(32, ge=1, description="at most this many regions (the largest) per result")
    mask_peak_fraction: float = Field(PEAK_FRACTION, ge=0, lt=1, description=(
        "each connected part of the defect mask keeps only the pixels at or above this fraction of its "
        "own peak (0.5 = half maximum: a strong defect's mask follows the defect, not the blur around "
        "it); 0 = every pixel above the pixel threshold"))


class AlarmConfig(_Strict):
    n: int = Field(3, ge=1, description="an alarm starts when n of the last m frames are anomalous")
    m: int = Field(5, ge=1)
    clear_frames: int = Field(5, ge=1, description="hysteresis: the alarm ends after this many normal frames in a row")
    update_interval_s: float = Field(5.0, gt=0, description="seconds between 'update' events of an active alarm")
    outbox_max_events: int = Field(100000, ge=10, description="outbox bound; beyond it the oldest 'update' events are dropped first")

    @model_validator(mode="after")
    def _n_le_m(self):
        if self.n > self.m:
            raise ValueError(f"alarms.n ({self.n}) must be <= alarms.m ({self.m})")
        return self


class EvidenceConfig(_Strict):
    enabled: bool = Field(True, description="save anomalous frames, masks and overlays")
    dir: Path = Field(Path("evidence"), strict=False, description="folder inside state_dir")

    @field_validator("dir")
    @classmethod
    def _inside(cls, v: Path) -> Path:
        if v.is_absolute() or ".." in v.parts or v == Path("."):
            raise ValueError(f"{str(v)!r} must be a folder name inside state_dir (relative, no '..'), e.g. evidence")
        return v
    quota_mb: float = Field(500.0, gt=0, description="size quota; the oldest files are deleted first")
    min_interval_s: float = Field(1.0, ge=0, description="per camera, at most one saved frame per this many seconds")
    frame_format: Literal["jpg", "png"] = Field("jpg", description="format of the saved frame (png is lossless, larger)")


class HealthConfig(_Strict):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stale_after_s: float = Field(10.0, gt=0, description="a camera with no frame for this long is reported offline")
    reopen_min_s: float = Field(1.0, gt=0, description="first retry delay of a lost camera (doubles up to reopen_max_s)")
    reopen_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self):
        _ordered(self.reopen_min_s, self.reopen_max_s, "reopen_min_s", "reopen_max_s")
        return self


class EdgeConfig(_Strict):
    node: str = Field(description="this daemon's name in MQTT topics")
    state_dir: Path = Field(default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "/var/lib/haloae-edge")),
                            strict=False, description="engines, outbox and evidence live here (systemd StateDirectory=)")
    cameras: list[AnyCamera] = Field(min_length=1, description="one entry per camera; its kind (edge/sources/) "
                                     "says which other keys it takes")
    model: ModelConfig
    mqtt: MqttConfig = MqttConfig()
    publish: PublishConfig = PublishConfig()
    alarms: AlarmConfig = AlarmConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    health: HealthConfig = HealthConfig()
    http: HttpConfig = HttpConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    drift: DriftConfig = DriftConfig()

    @field_validator("node")
    @classmethod
    def _check_node(cls, v: str) -> str:
        return check_identifier(v, "node")

    @field_validator("cameras", mode="before")
    @classmethod
    def _camera_kinds(cls, v, info: ValidationInfo):
        """``kind: auto`` becomes the kind the source names (paths relative to the config's folder)."""
        base_dir = (info.context or {}).get("base_dir")
        return [with_kind(c, base_dir) for c in v] if isinstance(v, list) else v

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, cameras):
        ids = [c.id for c in cameras]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        return cameras

    @property
    def prefix(self) -> str:
        return (self.mqtt.prefix or f"haloae/{self.node}").rstrip("/")

    def inside_state(self, path: Path) -> Path:
        """Resolve ``path`` inside ``state_dir``; refuse one that escapes it."""
        return inside_dir(self.state_dir, path)


def inside_dir(root: Path, path: Path) -> Path:
    """Resolve ``path`` inside ``root``; raise :class:`ConfigError` for one that escapes it."""
    root = Path(root).resolve()
    full = (root / path).resolve()
    if full != root and root not in full.parents:
        raise ConfigError(f"{path} escapes state_dir {root}: use a path inside it")
    return full


def _format_error(err: ValidationError) -> str:
    return format_error(err, EdgeConfig, unknown_hint="see configs/edge/*.yaml for the keys",
                        locate=_camera_location)


def _camera_location(first: dict, loc: list) -> tuple[list, str | None]:
    """Camera errors: the key path without the union's kind tag, and the kind-aware wording."""
    path, kind = split_error_location(tuple(loc))
    if first["type"] == "extra_forbidden" and kind:
        return list(path), (f"unknown key for a {kind} camera (check its spelling; see "
                            "configs/edge/*.yaml for the keys)")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return [*path, "kind"], (f"unknown camera kind {first.get('ctx', {}).get('tag', '')!r}: "
                                 f"use one of {', '.join(kind_names())}")
    return list(path), None


def parse_config(data: dict, base_dir: Path | None = None) -> EdgeConfig:
    """Validate a dict; relative file paths are taken relative to ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with at least 'node', 'cameras' and 'model'")
    try:
        cfg = EdgeConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    _load_zones(cfg)
    return cfg


def _load_zones(cfg: EdgeConfig) -> None:
    """Read the cameras' ignore-zone files; check the zones against the roi size."""
    for i, cam in enumerate(cfg.cameras):
        where = f"cameras.{i}.ignore_zones"
        try:
            if isinstance(cam.ignore_zones, Path):
                cam.ignore_zones = load_zones(cam.ignore_zones)
        except ZonesError as err:
            raise ConfigError(f"{where}: {err}") from None
        if cam.ignore_zones is not None and cam.roi is not None and tuple(cam.ignore_zones.size) != tuple(cam.roi[2:]):
            raise ConfigError(f"{where}: size {list(cam.ignore_zones.size)} differs from the roi's {list(cam.roi[2:])}: "
                              "zones are in pixels of the frame after the roi crop; redraw them or fix size")


def _resolve_paths(cfg: EdgeConfig, base: Path) -> None:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    for cam in cfg.cameras:
        if isinstance(cam.ignore_zones, Path):
            cam.ignore_zones = fix(cam.ignore_zones)
        cam.resolve_paths(base)
    cfg.model.bundle = fix(cfg.model.bundle)
    cfg.model.checkpoint = fix(cfg.model.checkpoint)
    cfg.state_dir = fix(cfg.state_dir) or cfg.state_dir
    if cfg.mqtt.tls:
        for key in ("ca", "cert", "key"):
            setattr(cfg.mqtt.tls, key, fix(getattr(cfg.mqtt.tls, key)))


def check_files(cfg: EdgeConfig) -> None:
    """Check that the files the config names exist and are readable (bundle, TLS files)."""
    if not (cfg.model.bundle / "manifest.json").is_file():
        raise ConfigError(f"model.bundle: no bundle at {cfg.model.bundle} (manifest.json missing); "
                          "create one with haloae-export CHECKPOINT --out DIR")
    if cfg.model.backend == "torch" and (cfg.model.checkpoint is None or not cfg.model.checkpoint.is_file()):
        raise ConfigError(f"model.checkpoint: the torch backend needs the training checkpoint file, got {cfg.model.checkpoint}")
    if cfg.mqtt.tls:
        for key in ("ca", "cert", "key"):
            p = getattr(cfg.mqtt.tls, key)
            if p is not None and not os.access(p, os.R_OK):
                raise ConfigError(f"mqtt.tls.{key}: cannot read {p}; check the path and its permissions")
        if (cfg.mqtt.tls.cert is None) != (cfg.mqtt.tls.key is None):
            raise ConfigError("mqtt.tls: give both cert and key for mutual TLS, or neither")
    problem = http_password_problem(cfg.http)
    if problem:
        raise ConfigError(problem)


def load_config(path: str | Path, check: bool = True) -> EdgeConfig:
    """Read, validate and (with ``check``) check the files of a daemon config."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg = parse_config(data, base_dir=path.parent)
    if check:
        check_files(cfg)
    return cfg

"""Config sections of the operator's surface: the HTTP server (live view, ``/metrics``), Home
Assistant discovery and score drift. Part of the daemon's schema (``edge/config.py``); every
section forbids unknown keys. Live view and metrics are off by default and cost nothing then."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator

from haloae.validate import check_prefix, mqtt_text_problem

from .config_base import Strict, check_credential_name, check_env_name, secret

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpConfig(Strict):
    """The daemon's HTTP server: a live-view page and/or Prometheus ``/metrics`` (docs/operations.md)."""

    live_view: bool = Field(False, description="serve the live-view page: cameras, scores, MJPEG overlays, "
                            "latest.jpg and a threshold slider (JPEGs are encoded only while someone watches)")
    metrics: bool = Field(False, description="serve Prometheus metrics at /metrics (needs prometheus_client: "
                          "pip install 'haloae[operator]')")
    bind: str = Field("127.0.0.1", description="address to listen on; anything but a loopback address needs "
                      "the password (password_env / password_credential)")
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    username: str = Field("haloae", description="basic-auth user name (the password is also accepted as a "
                          "bearer token, e.g. by Prometheus)")
    password_env: str = Field("HALOAE_HTTP_PASSWORD", description="environment variable holding the password")
    password_credential: str = Field("http_password", description="file name in $CREDENTIALS_DIRECTORY "
                                     "holding the password")
    stream_fps: float = Field(5.0, gt=0, le=30, description="at most this many MJPEG frames per second per viewer")
    max_streams: int = Field(4, ge=1, le=64, description="at most this many MJPEG viewers at once (more get 503)")
    jpeg_quality: int = Field(80, ge=10, le=95, description="JPEG quality of the live-view images")
    history_s: float = Field(120.0, gt=0, le=3600, description="seconds of score history in the page's chart")

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        if v in LOOPBACK_NAMES:
            return v
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"bind must be an IP address (127.0.0.1, ::1, 0.0.0.0, a local address) or "
                             f"localhost, got {v!r}") from None
        return v

    @field_validator("username")
    @classmethod
    def _check_user(cls, v: str) -> str:
        if not v or ":" in v or mqtt_text_problem(v) or len(v) > 64:
            raise ValueError(f"username must be 1-64 printable characters without ':', got {v!r}")
        return v

    @field_validator("password_env")
    @classmethod
    def _check_env(cls, v: str) -> str:
        return check_env_name(v)

    @field_validator("password_credential")
    @classmethod
    def _check_credential(cls, v: str) -> str:
        return check_credential_name(v, mqtt_text_problem(v))

    @property
    def enabled(self) -> bool:
        return self.live_view or self.metrics

    @property
    def loopback(self) -> bool:
        return is_loopback(self.bind)

    def password(self) -> str | None:
        """The password from the environment or the systemd credential; never from the YAML."""
        return secret(self.password_env, self.password_credential)


class HomeAssistantConfig(Strict):
    """Home Assistant MQTT discovery: one device per node, per camera a defect binary sensor, a score
    sensor, a threshold number and an image of the latest anomalous overlay (docs/mqtt.md)."""

    enabled: bool = Field(False, description="publish Home Assistant discovery configs and the topics they use")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix")
    device_name: str | None = Field(None, description="name of the node's device in Home Assistant "
                                    "(default: HaloAE <node>)")
    score_interval_s: float = Field(1.0, ge=1.0, le=3600, description="seconds between score sensor messages "
                                    "(at most 1 Hz): the highest score of the frames inspected meanwhile")
    image_interval_s: float = Field(5.0, ge=1.0, le=3600, description="at most one defect image per camera "
                                    "per this many seconds (a JPEG is encoded only then)")

    @field_validator("discovery_prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        return check_prefix(v)

    @field_validator("device_name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or mqtt_text_problem(v) or len(v) > 100):
            raise ValueError(f"device_name must be 1-100 printable characters, got {v!r}")
        return v


class DriftConfig(Strict):
    """Score drift: rolling median of the scores of frames judged ok, against the bundle's calibration."""

    enabled: bool = Field(True, description="watch the score median of normal frames (needs a bundle with "
                          "calibration statistics: threshold.normal_scores)")
    factor: float = Field(1.5, gt=1.0, le=100, description="drift when the median is more than factor times, or "
                          "less than 1/factor times, the calibration median")
    window: int = Field(300, ge=20, le=100_000, description="normal frames in the rolling window")
    min_frames: int = Field(100, ge=10, description="normal frames needed before the first judgement")

    @model_validator(mode="after")
    def _min_le_window(self):
        if self.min_frames > self.window:
            raise ValueError(f"drift.min_frames ({self.min_frames}) must be <= drift.window ({self.window})")
        return self


def http_password_problem(cfg: HttpConfig) -> str | None:
    """Why the HTTP server may not start with this config and environment, else None."""
    if cfg.enabled and not cfg.loopback and not cfg.password():
        return (f"http.bind {cfg.bind} is reachable from other machines: set a password in ${cfg.password_env} or "
                f"$CREDENTIALS_DIRECTORY/{cfg.password_credential} (systemd LoadCredential=), or bind 127.0.0.1")
    return None

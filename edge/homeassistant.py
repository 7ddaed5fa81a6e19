"""Home Assistant MQTT discovery (opt-in, ``homeassistant.enabled``): one device per node, per camera

- ``binary_sensor`` "<camera> defect" on the retained alarm state ``<prefix>/<camera>/alarm/state``
  (``ON`` / ``OFF``, device class ``problem``);
- ``sensor`` "<camera> score" on ``<prefix>/<camera>/score``: the highest score of the frames
  inspected during each ``homeassistant.score_interval_s`` (>= 1 s, so at most 1 Hz);
- ``number`` "<camera> threshold": ``<prefix>/<camera>/threshold/set`` → ``.../threshold/state``
  (the daemon's own settings topics, same validation);
- ``image`` "<camera> last defect" on the retained ``<prefix>/<camera>/defect_image`` (JPEG of the
  latest anomalous overlay, at most one per ``homeassistant.image_interval_s``).

Every entity's availability is ``<prefix>/available`` (``online`` / ``offline``, the last will
and the clean stop). Config topics follow Home Assistant's discovery scheme
``<discovery_prefix>/<component>/<node_id>/<object_id>/config`` (retained), and are published again
when Home Assistant announces itself on ``<discovery_prefix>/status`` = ``online``. Payload keys
are those of Home Assistant's MQTT integration documentation (docs/mqtt.md lists them).
"""

from __future__ import annotations

import json
import threading
import time

import haloae

from . import topics
from .config_surface import HomeAssistantConfig

COMPONENTS = ("binary_sensor", "sensor", "number", "image")
SCORE_EXPIRE_S = 60  # a score older than this shows "unavailable" (camera gone, daemon hung)


def alarm_state_topic(prefix: str, camera: str) -> str:
    return topics.alarm_state(prefix, camera)


class HomeAssistant:
    """Discovery payloads and the rate limits of the score sensor and the defect image. Thread-safe."""

    def __init__(self, cfg: HomeAssistantConfig, node: str, prefix: str, cameras: list[str]):
        self.cfg, self.node, self.prefix, self.cameras = cfg, node, prefix, list(cameras)
        self.node_id = f"haloae_{node}"
        self.birth_topic = topics.ha_birth(cfg.discovery_prefix)
        self._lock = threading.Lock()
        self._score_max: dict[str, float] = {}
        self._score_next: dict[str, float] = {}
        self._image_next: dict[str, float] = {}

    # -- topics --------------------------------------------------------------------------
    def score_topic(self, camera: str) -> str:
        return topics.camera(self.prefix, camera, topics.SCORE)

    def image_topic(self, camera: str) -> str:
        return topics.camera(self.prefix, camera, topics.DEFECT_IMAGE)

    def config_topic(self, component: str, camera: str, what: str) -> str:
        return topics.ha_config(self.cfg.discovery_prefix, component, self.node_id, f"{camera}_{what}")

    # -- discovery -----------------------------------------------------------------------
    def _common(self, camera: str, what: str, name: str) -> dict:
        return {
            "name": name, "unique_id": f"{self.node_id}_{camera}_{what}",
            "availability": [{"topic": topics.available(self.prefix), "payload_available": "online",
                              "payload_not_available": "offline"}],
            "device": {"identifiers": [self.node_id], "name": self.cfg.device_name or f"HaloAE {self.node}",
                       "manufacturer": "HaloAE Edge", "model": "haloae-edge inspection daemon",
                       "sw_version": haloae.__version__},
            "origin": {"name": "haloae-edge", "sw_version": haloae.__version__},
        }

    def discovery(self) -> list[tuple[str, bytes]]:
        """(config topic, JSON payload) of every entity of every camera."""
        out = []
        for cam in self.cameras:
            configs = {
                ("binary_sensor", "defect"): {
                    **self._common(cam, "defect", f"{cam} defect"), "state_topic": alarm_state_topic(self.prefix, cam),
                    "payload_on": "ON", "payload_off": "OFF", "device_class": "problem", "qos": 1},
                ("sensor", "score"): {
                    **self._common(cam, "score", f"{cam} score"), "state_topic": self.score_topic(cam),
                    "state_class": "measurement", "suggested_display_precision": 3, "expire_after": SCORE_EXPIRE_S,
                    "icon": "mdi:chart-bell-curve"},
                ("number", "threshold"): {
                    **self._common(cam, "threshold", f"{cam} threshold"),
                    "command_topic": topics.set_request(self.prefix, cam, "threshold"),
                    "state_topic": topics.state(self.prefix, cam, "threshold"),
                    "min": 0.01, "max": 10.0, "step": 0.01, "mode": "box", "entity_category": "config",
                    "qos": 1, "retain": False},
                ("image", "defect_image"): {
                    **self._common(cam, "defect_image", f"{cam} last defect"), "image_topic": self.image_topic(cam),
                    "content_type": "image/jpeg"},
            }
            for (component, what), doc in configs.items():
                out.append((self.config_topic(component, cam, what),
                            json.dumps(doc, separators=(",", ":")).encode()))
        return out

    # -- rate limits (called for every inspected frame: keep them cheap) ------------------
    def score_due(self, camera: str, score: float, now: float | None = None) -> str | None:
        """Fold ``score`` into this interval's maximum; the text to publish when the interval is over."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._score_max[camera] = max(score, self._score_max.get(camera, float("-inf")))
            if now < self._score_next.get(camera, 0.0):
                return None
            self._score_next[camera] = now + self.cfg.score_interval_s
            value = self._score_max.pop(camera)
        return f"{value:.4f}"

    def image_due(self, camera: str, now: float | None = None) -> bool:
        """Whether an anomalous frame of ``camera`` may become the defect image now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now < self._image_next.get(camera, 0.0):
                return False
            self._image_next[camera] = now + self.cfg.image_interval_s
            return True

"""Every MQTT topic of the daemon, in one place (the layout docs/mqtt.md describes).

``prefix`` is the node's topic prefix (``mqtt.prefix``, default ``haloae/<node>``). Per camera:
``<prefix>/<camera>/<kind>`` with a kind of :data:`CAMERA_KINDS`; settings and commands:
``<prefix>/[<camera>/]<name>/set``, their outcome ``.../<name>/state``; per node:
``<prefix>/available``, ``stats``, ``error``. Home Assistant's own topics live under its
``discovery_prefix``. Subscribers (``haloae-monitor``, benchmarks) use :func:`every_camera`.
No imports: anything (the daemon, its tools, tests) can use it.
"""

from __future__ import annotations

# --- last topic levels ------------------------------------------------------------------------
RESULT = "result"  # JSON per published frame
MASK = "mask"  # PNG defect mask of a result
OVERLAY = "overlay"  # JPEG heat map of an anomalous result
ALARM = "alarm"  # alarm events start / update / end (QoS 1, from the outbox)
STATUS = "status"  # retained camera health
DRIFT = "drift"  # retained score drift
SCORE = "score"  # Home Assistant score sensor
DEFECT_IMAGE = "defect_image"  # Home Assistant image entity
CAMERA_KINDS = (RESULT, MASK, OVERLAY, ALARM, STATUS, DRIFT, SCORE, DEFECT_IMAGE)

AVAILABLE = "available"  # retained online / offline (last will)
STATS = "stats"
ERROR = "error"
SET = "set"  # a setting or command request: <name>/set
STATE = "state"  # its retained outcome: <name>/state


def camera(prefix: str, camera_id: str, kind: str) -> str:
    """``<prefix>/<camera>/<kind>`` (``kind``: one of :data:`CAMERA_KINDS`)."""
    return f"{prefix}/{camera_id}/{kind}"


def result(prefix: str, camera_id: str) -> str:
    return camera(prefix, camera_id, RESULT)


def status(prefix: str, camera_id: str) -> str:
    return camera(prefix, camera_id, STATUS)


def alarm(prefix: str, camera_id: str) -> str:
    return camera(prefix, camera_id, ALARM)


def alarm_state(prefix: str, camera_id: str) -> str:
    """Retained ``ON`` / ``OFF``: ``<prefix>/<camera>/alarm/state``."""
    return f"{alarm(prefix, camera_id)}/{STATE}"


def available(prefix: str) -> str:
    return f"{prefix}/{AVAILABLE}"


def stats(prefix: str) -> str:
    return f"{prefix}/{STATS}"


def error(prefix: str) -> str:
    return f"{prefix}/{ERROR}"


def _named(prefix: str, camera_id: str | None, name: str, last: str) -> str:
    return f"{prefix}/{camera_id}/{name}/{last}" if camera_id else f"{prefix}/{name}/{last}"


def set_request(prefix: str, camera_id: str | None, name: str) -> str:
    """``<prefix>/[<camera>/]<name>/set`` of a setting (``threshold``) or command (``model``, ...)."""
    return _named(prefix, camera_id, name, SET)


def state(prefix: str, camera_id: str | None, name: str) -> str:
    """``<prefix>/[<camera>/]<name>/state``: the retained value of a setting, a command's outcome."""
    return _named(prefix, camera_id, name, STATE)


def set_subscriptions(prefix: str) -> list[str]:
    """What the daemon subscribes to for settings and commands (node and camera level)."""
    return [f"{prefix}/+/{SET}", f"{prefix}/+/+/{SET}"]


def is_set_request(topic: str) -> bool:
    return topic.endswith(f"/{SET}")


def every_camera(prefix: str, kind: str) -> str:
    """The subscription ``<prefix>/+/<kind>`` (every camera of the prefix; ``prefix`` may hold ``+``)."""
    return f"{prefix}/+/{kind}"


def everything(prefix: str) -> str:
    """``<prefix>/#``: every topic of the node (the broker ACL the daemon needs)."""
    return f"{prefix}/#"


def kind_of(topic: str) -> str:
    """The last level of ``topic`` (``result``, ``alarm``, ``available``, ...)."""
    return topic.rsplit("/", 1)[-1]


# --- Home Assistant ---------------------------------------------------------------------------
def ha_birth(discovery_prefix: str) -> str:
    """Home Assistant's birth message (``online`` when it starts)."""
    return f"{discovery_prefix}/{STATUS}"


def ha_config(discovery_prefix: str, component: str, node_id: str, object_id: str) -> str:
    """The retained discovery config of one entity."""
    return f"{discovery_prefix}/{component}/{node_id}/{object_id}/config"

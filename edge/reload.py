"""Loading a model, and SIGHUP: what a reload may change while the daemon runs.

:func:`load_model` does everything that can fail before a model is used: the bundle is
verified (hashes, manifest, thresholds), the backend is built and its graph checked against the
manifest, the thresholds are read. The daemon calls it at start and on SIGHUP; on SIGHUP the
running model keeps running until the new one is fully loaded, and on any failure it simply
stays.

:func:`config_changes` compares the running config with the edited YAML: ``model.*`` and the
cameras' ``threshold`` and ``ignore_zones`` are applied live; anything else (cameras added or moved, MQTT, publish,
alarms, health, evidence, http, homeassistant, drift) needs a restart, and the reload says so by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from haloae.bundle import Bundle
from haloae.manifest import Manifest
from haloae.runtime import Backend, load_backend

from .config import ConfigError, EdgeConfig
from .infer import bundle_thresholds, check_zones
from haloae.zones import ZonesError


@dataclass(frozen=True)
class LoadedModel:
    backend: Backend
    manifest: Manifest
    model_id: str
    image_threshold: float
    pixel_threshold: float


def load_model(cfg: EdgeConfig) -> LoadedModel:
    """Verify the bundle, check the cameras' ignore zones against it and build its backend;
    raises BundleError / ConfigError / BackendUnavailable."""
    bundle = Bundle.open(cfg.model.bundle)
    image, pixel = bundle_thresholds(bundle.manifest)
    try:
        check_zones(cfg.cameras, bundle.manifest)
    except ZonesError as err:
        raise ConfigError(f"cameras.*.ignore_zones: {err}") from None
    m = cfg.model
    backend = load_backend(bundle, m.backend, precision=m.precision, threads=m.threads, checkpoint=m.checkpoint,
                           engine_dir=cfg.state_dir / "engines")
    return LoadedModel(backend, bundle.manifest, bundle.model_id, image, pixel)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}{i}."))
        return out or {prefix[:-1]: []}
    return {prefix[:-1]: value}


def config_changes(old: EdgeConfig, new: EdgeConfig) -> tuple[list[str], list[str]]:
    """``(live, restart)``: the dotted keys that changed, split by whether a reload applies them."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object()))
    same_cameras = [c.id for c in old.cameras] == [c.id for c in new.cameras]
    live, restart = [], []
    for key in changed:
        parts = key.split(".")
        is_live = parts[0] == "model" or (same_cameras and parts[0] == "cameras" and (
            parts[-1] == "threshold" or parts[2:3] == ["ignore_zones"]))
        (live if is_live else restart).append(key)
    return live, restart

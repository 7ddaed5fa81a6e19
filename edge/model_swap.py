"""``<prefix>/model/set``: promote a new bundle while the daemon inspects, and ``model/state``.

A ``model/set`` names a bundle folder on this machine. The main thread (never paho's or the
inference thread) then does everything that can fail BEFORE the swap: the bundle is verified
(manifest, sha256 of every model file, thresholds), its backend is built, the cameras' ignore
zones are checked against it, and the new model is run once on a grey batch whose outputs must
have the manifest's shapes and be finite (a bundle that loads but cannot score is refused too).
Only then the inference worker takes it from its next batch on; the frames in flight are scored
by the old one, so results keep flowing. On any failure the running model stays.

The outcome is published retained on ``<prefix>/model/state`` (docs/mqtt.md): at start, after
every ``model/set`` (``ok`` or ``refused`` with the reason) and after a SIGHUP reload. The
promoted bundle lives in memory: a restart or a SIGHUP reload (which re-reads the YAML) goes
back to ``model.bundle`` of the YAML (edit it to make the promotion permanent), exactly like
``threshold/set``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from haloae.errors import UserError
from haloae.manifest import BundleError

from . import topics
from .alarms import SCHEMA_VERSION, iso_utc
from .payloads import dumps
from .reload import LoadedModel, load_model

if TYPE_CHECKING:
    from .app import EdgeApp

log = logging.getLogger(__name__)


class ModelRefused(UserError, ValueError):
    """A bundle that verified and loaded but cannot score (wrong shapes, NaN / inf)."""


def warm_up(model: LoadedModel) -> float:
    """Run ``model`` once on a mid-grey batch; its outputs must have the manifest's shapes and be
    finite. Returns the call's milliseconds (the first call pays lazy initialisation)."""
    n, c, h, w = model.backend.input_shape
    t0 = time.perf_counter()
    scores, maps = model.backend.run(np.full((n, c, h, w), 0.5, np.float32))
    ms = (time.perf_counter() - t0) * 1000.0
    if np.shape(scores) != (n,) or np.shape(maps) != (n, 1, h, w):
        raise ModelRefused(f"the model returned score {list(np.shape(scores))} and map {list(np.shape(maps))}, "
                           f"its manifest says [{n}] and [{n}, 1, {h}, {w}]; re-export it with haloae-export")
    if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
        raise ModelRefused("the model outputs NaN / inf on a grey test image; re-export it with haloae-export "
                           "(check it with haloae-eval --bundle)")
    return ms


class ModelSwitch:
    """Queues ``model/set`` requests (publisher thread) and carries them out (main thread)."""

    def __init__(self, app: "EdgeApp"):
        self.app = app
        self._requests: list[str] = []

    @property
    def topic(self) -> str:
        return topics.state(self.app.cfg.prefix, None, "model")

    def request(self, path: str) -> None:
        """From the publisher's thread: a checked ``model/set`` payload."""
        self._requests.append(path)
        self.app.wake()

    def poll(self) -> None:
        """Main thread: carry out the waiting requests (the newest last)."""
        while self._requests:
            self.promote(self._requests.pop(0))

    def promote(self, path: str) -> bool:
        app = self.app
        old_id, old_bundle = app.model_id, str(app.cfg.model.bundle)
        log.info("model/set: verifying and loading %s (running model %s)", path, old_id)
        self.publish("loading", requested=path)
        t0 = time.monotonic()
        try:
            if not Path(path).is_dir():
                raise BundleError(f"{path} is not a folder on this machine; copy the bundle folder written by "
                                  "haloae-export there first")
            model_cfg = app.cfg.model.model_copy(update={"bundle": Path(path)})
            cfg = app.cfg.model_copy(update={"model": model_cfg})
            model = load_model(cfg)
            warm_ms = warm_up(model)
            app.swap_model(model, model_cfg)
        except (UserError, OSError) as err:  # a bad bundle / backend / config: the running model stays
            return self._refused(path, old_id, old_bundle, str(err))
        except Exception as err:  # noqa: BLE001 - a bug while loading: keep the running model, show it
            log.exception("model/set failed")
            return self._refused(path, old_id, old_bundle, f"{type(err).__name__}: {err}")
        log.info("model/set: now running model %s from %s (was %s; loaded in %.1f s)", model.model_id, path,
                 old_id, time.monotonic() - t0)
        self.publish("ok", previous=old_id, load_s=round(time.monotonic() - t0, 2), warm_up_ms=round(warm_ms, 1))
        return True

    def _refused(self, path: str, old_id: str, old_bundle: str, why: str) -> bool:
        why = " ".join(why.split())
        text = f"model/set {path} refused, still running model {old_id} from {old_bundle}: {why}"
        log.error("%s", text)
        self.publish("refused", requested=path, error=why)
        self.app.publisher.publish_error("model", text, requested=path)
        return False

    def publish(self, state: str, **fields) -> None:
        """Retained ``<prefix>/model/state``: what runs now, and the last request's outcome."""
        app = self.app
        doc = {"v": SCHEMA_VERSION, "state": state, "model": app.model_id,
               "bundle": str(app.cfg.model.bundle), "backend": app.backend.description, **fields,
               "timestamp": iso_utc(time.time())}
        app.publisher.publish_retained(self.topic, dumps(doc))

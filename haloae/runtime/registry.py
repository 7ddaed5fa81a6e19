"""The backend registry and ``load_backend``: the ONE way anything runs a bundle.

After Frigate's ``detector_types.py`` (plugins found by importing every module of a package) and
``detection_runners.py`` (one runner factory every caller uses). Each module in
``haloae/runtime/backends/`` registers its class with ``@register(name, priority)``; importing
them is cheap (their inference libraries are imported only when a backend is built), so the
names, the order ``auto`` tries them in and the edge config's ``model.backend`` choices all
come from here. Adding a backend is one new file in that folder.

``load_backend(bundle, "auto")`` tries the registered backends from the highest priority down and
returns the first that loads; each skipped one is logged with its reason, and the reasons stay
on the result (``backend.skipped``, for the status topic). A named backend that cannot load
raises :class:`BackendUnavailable` (the daemon: one line, exit 2). A bundle that is wrong
(:class:`BundleError`) is raised at once: no other backend can fix it.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path
from typing import Callable, TypeVar

from haloae.bundle import Bundle
from haloae.manifest import BundleError

from .base import Backend, BackendUnavailable, RuntimeOptions

log = logging.getLogger(__name__)

AUTO = "auto"
B = TypeVar("B", bound=type[Backend])


class Registry:
    """Backend classes by name, with their ``auto`` priority."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend]] = {}

    def register(self, name: str, priority: int) -> Callable[[B], B]:
        """Class decorator: ``@register("onnxruntime", priority=20)``."""
        def deco(cls: B) -> B:
            if name == AUTO or name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"backend name {name!r} is taken")
            cls.name, cls.priority = name, priority
            self._classes[name] = cls
            return cls
        return deco

    def names(self) -> tuple[str, ...]:
        """Registered names, highest priority first (the order ``auto`` tries)."""
        return tuple(sorted(self._classes, key=lambda n: (-self._classes[n].priority, n)))

    def choices(self) -> tuple[str, ...]:
        """What a user may configure: ``auto`` and every registered name."""
        return (AUTO, *self.names())

    def get(self, name: str) -> type[Backend]:
        if name not in self._classes:
            raise BackendUnavailable(f"unknown backend {name!r}: use one of {', '.join(self.choices())}")
        return self._classes[name]

    def load(self, bundle: Bundle, name: str = AUTO, options: RuntimeOptions | None = None) -> Backend:
        options = options or RuntimeOptions()
        names = self.names() if name == AUTO else (self.get(name).name,)
        skipped: list[str] = []
        for candidate in names:
            try:
                backend = self._classes[candidate](bundle, options)
            except BundleError:  # the bundle itself is wrong: no other backend can fix that
                raise
            except BackendUnavailable as exc:
                if name != AUTO:
                    raise
                skipped.append(f"{candidate}: {exc}")
                log.info("backend %s skipped: %s", candidate, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a failed engine build: fall back, say why
                if name != AUTO:
                    raise BackendUnavailable(f"{candidate}: {type(exc).__name__}: {exc}") from exc
                skipped.append(f"{candidate}: {type(exc).__name__}: {exc}")
                log.warning("backend %s failed to load, trying the next: %s", candidate, exc)
                continue
            backend.skipped = skipped
            log.info("inference backend: %s%s", backend.description,
                     f" (skipped {'; '.join(skipped)})" if skipped else "")
            return backend
        raise BackendUnavailable("no inference backend can run the bundle: " + "; ".join(skipped))


REGISTRY = Registry()
register = REGISTRY.register


def _discover() -> None:
    """Import every module of ``haloae.runtime.backends`` (each registers its class)."""
    from . import backends

    for mod in pkgutil.iter_modules(backends.__path__):
        importlib.import_module(f"{backends.__name__}.{mod.name}")


def choices() -> tuple[str, ...]:
    """``auto`` and the registered backend names, highest priority first."""
    return REGISTRY.choices()


def load_backend(bundle: Bundle | Path, name: str = AUTO, *, precision: str = "fp32", threads: int = 0,
                 device: str = "auto", checkpoint: Path | None = None, engine_dir: Path | None = None) -> Backend:
    """Run ``bundle`` (a :class:`Bundle`, or a folder: verified first) with the backend ``name``
    (``auto``: the highest-priority one that loads). Options: :class:`RuntimeOptions`."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(Path(bundle))
    opts = RuntimeOptions(precision=precision, threads=threads, device=device,
                          checkpoint=None if checkpoint is None else Path(checkpoint),
                          engine_dir=None if engine_dir is None else Path(engine_dir))
    return REGISTRY.load(bundle, name, opts)


_discover()

"""Evidence: anomalous frames, their masks, overlays and result JSON saved on disk, within a
size quota (the oldest files are deleted first).

Layout (inside ``state_dir``; the folder is ``evidence.dir``)::

    evidence/<camera>/<YYYY-MM-DD>/<HHMMSS.mmm>_<frame_id>_frame.jpg   (or .png)
                                   <HHMMSS.mmm>_<frame_id>_mask.png
                                   <HHMMSS.mmm>_<frame_id>_overlay.jpg  (when overlays are on)
                                   <HHMMSS.mmm>_<frame_id>.json         (the result message)

Dates and times are UTC. Camera ids are checked against the config's id pattern, so a path
cannot leave the evidence folder. A full disk is logged (once per minute) and counted, never
fatal: inspection and MQTT go on.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

_CAMERA = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class EvidenceStore:
    """Writes evidence files and enforces ``quota_bytes`` over the whole folder."""

    def __init__(self, root: Path, quota_bytes: int):
        self.root, self.quota = Path(root), int(quota_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self.errors = 0
        self.deleted = 0
        self._last_error_log = 0.0
        self._files: list[tuple[float, str, int]] = []  # heap of (mtime, path, size)
        self._total = 0
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                self._files.append((st.st_mtime, path, st.st_size))
                self._total += st.st_size
        heapq.heapify(self._files)
        self._enforce()

    @property
    def total_bytes(self) -> int:
        return self._total

    def save(self, camera: str, frame_id: int, timestamp: float, files: dict[str, bytes]) -> Path | None:
        """Write ``files`` ({suffix: bytes}, e.g. ``{"_frame.jpg": b"...", ".json": b"..."}``) for
        one frame; returns the folder, or None when the disk refused (logged, counted)."""
        if not _CAMERA.match(camera):
            raise ValueError(f"camera id {camera!r} is not a valid id; evidence is not saved")
        when = datetime.fromtimestamp(timestamp, tz=timezone.utc)
        folder = self.root / camera / when.strftime("%Y-%m-%d")
        stem = f"{when.strftime('%H%M%S')}.{when.microsecond // 1000:03d}_{int(frame_id)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for suffix, data in files.items():
                if "/" in suffix or ".." in suffix:
                    raise ValueError(f"bad evidence file suffix {suffix!r}")
                path = folder / f"{stem}{suffix}"
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                heapq.heappush(self._files, (time.time(), str(path), len(data)))
                self._total += len(data)
        except OSError as err:
            self.errors += 1
            if time.monotonic() - self._last_error_log > 60:
                self._last_error_log = time.monotonic()
                log.warning("cannot save evidence in %s: %s (disk full? lower evidence.quota_mb or free space; "
                            "inspection goes on; %d evidence error(s) so far)", folder, err.strerror or err, self.errors)
            return None
        finally:
            self._enforce()
        return folder

    def _enforce(self) -> None:
        while self._total > self.quota and self._files:
            _, path, size = heapq.heappop(self._files)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("cannot delete old evidence %s: %s", path, err)
                continue
            self._total -= size
            self.deleted += 1
            self._prune_dirs(Path(path).parent)

    def _prune_dirs(self, folder: Path) -> None:
        """Remove empty date / camera folders left behind by the quota."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

"""The on-disk outbox that makes alarm events survive broker outages, crashes and power cuts.

Every alarm event is committed to SQLite (``state_dir/outbox.sqlite``, WAL journal,
``synchronous=FULL``) *before* it is handed to MQTT, and deleted only when the broker's PUBACK
(QoS 1) for it comes back. :class:`OutboxSender` is the one thread that publishes: it keeps a
small window of events in flight, in order, and re-reads the table after every (re)connect, so
events that piled up during an outage, or that a crashed process left behind, go out in the
order they were raised. Delivery is at-least-once: a subscriber may see an event twice (after a
lost PUBACK or a crash between publish and delete) and drops repeats by ``(id, seq)``.

Size bound (``alarms.outbox_max_events``): when an event would exceed it, the oldest ``update``
events are deleted first; ``start`` and ``end`` events go only when there are no ``update``
events left to drop. Each drop logs a warning with the count.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL)"""


@dataclass(frozen=True)
class PendingEvent:
    seq: int
    kind: str
    topic: str
    payload: bytes


class Outbox:
    """Thread-safe SQLite queue of events waiting for a PUBACK."""

    def __init__(self, path: Path, max_events: int = 100000):
        self.path, self.max_events = Path(path), max_events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            self._count = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise OSError(f"cannot open the alarm outbox {self.path}: {err}; if the file is corrupt, move it "
                          "away (pending alarm events in it are lost) and restart") from None
        self.dropped = 0
        if self._count:
            log.info("outbox %s holds %d undelivered alarm event(s) from a previous run", self.path, self._count)

    def add(self, kind: str, topic: str, payload: bytes) -> int:
        """Persist one event (committed when this returns); returns its sequence number."""
        with self._lock:
            if self._count >= self.max_events:
                self._make_room()
            cur = self._db.execute("INSERT INTO events (kind, topic, payload, created) VALUES (?, ?, ?, ?)",
                                   (kind, topic, payload, time.time()))
            self._count += 1
            return cur.lastrowid

    def _make_room(self) -> None:
        over = self._count - self.max_events + 1
        n = self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE kind = 'update' "
                             "ORDER BY seq LIMIT ?)", (over,)).rowcount
        if n < over:
            n += self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                                  (over - n,)).rowcount
            log.warning("alarm outbox full (%d events): dropped the %d oldest events, start/end included; "
                        "is the broker reachable? raise alarms.outbox_max_events to keep more", self.max_events, n)
        else:
            log.warning("alarm outbox full (%d events): dropped the %d oldest 'update' event(s)", self.max_events, n)
        self._count -= n
        self.dropped += n

    def pending(self, after: int = 0, limit: int = 100) -> list[PendingEvent]:
        """Events with ``seq > after`` in order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, kind, topic, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()
        return [PendingEvent(s, k, t, bytes(p)) for s, k, t, p in rows]

    def delete(self, seqs: list[int]) -> None:
        """Forget acknowledged events (unknown sequence numbers are ignored)."""
        if not seqs:
            return
        with self._lock:
            n = self._db.execute(f"DELETE FROM events WHERE seq IN ({','.join('?' * len(seqs))})", seqs).rowcount
            self._count -= n

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()


class OutboxSender:
    """The thread that publishes outbox events at QoS 1 and deletes them on PUBACK.

    ``client`` is an :class:`~haloae.edge.mqtt_client.MqttClient`; call :meth:`wake` from its
    on_connect / on_publish hooks and after :meth:`Outbox.add`. Events in flight stay in paho's
    session when the connection drops and paho resends them on reconnect, so the sender tracks
    each message's own ``MQTTMessageInfo`` (no message-id bookkeeping, no races with PUBACKs).
    """

    def __init__(self, outbox: Outbox, client, window: int = 16):
        self.outbox, self.client, self.window = outbox, client, window
        self._inflight: dict[int, object] = {}  # seq -> MQTTMessageInfo
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="haloae-outbox", daemon=True)
        self.delivered = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def idle(self) -> bool:
        """True when nothing waits in the outbox or in flight."""
        return not self._inflight and len(self.outbox) == 0

    def flush(self, timeout: float) -> bool:
        """Wait until every event is acknowledged (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            self.wake()
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._step()
            except Exception:  # never let the alarm path die; retry on the next wake-up
                log.exception("alarm outbox sender failed; retrying in 1 s")
                self._stop.wait(1.0)

    def _step(self) -> None:
        done = [seq for seq, info in self._inflight.items() if info.is_published()]
        for seq in done:
            del self._inflight[seq]
        self.outbox.delete(done)
        self.delivered += len(done)
        if not self.client.connected or len(self._inflight) >= self.window:
            return
        last = max(self._inflight, default=0)
        for ev in self.outbox.pending(after=last, limit=self.window - len(self._inflight)):
            info = self.client.publish(ev.topic, ev.payload, qos=1, retain=False)
            if info is None:  # paho refused to queue it (queue full): retry on the next wake-up
                break
            self._inflight[ev.seq] = info

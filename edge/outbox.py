"""The alarm outbox: a delivery ledger on disk that survives broker outages, crashes and power cuts.

Every alarm event is committed to SQLite (``state_dir/outbox.sqlite``, WAL journal,
``synchronous=FULL``) on the decision path, before it is handed to MQTT; the sender
(``edge/delivery.py``) publishes it at QoS 1 and settles it here:

- ``delete`` on a successful PUBACK;
- ``dead_letter`` when the broker refuses it (MQTT 5 reason code >= 0x80) or the client cannot
  send it at all (a topic no broker takes): moved to the ``dead_letters`` table, kept for the
  operator, never retried, never blocking the events behind it.

Disk trouble (full, read-only, I/O error) never raises to the caller: new events go to a
bounded in-memory queue (:data:`MEMORY_MAX`), acknowledged events that cannot be deleted are
remembered so they are not sent again, and :meth:`maintain` retries the disk with backoff;
:attr:`problem` says what is wrong until the disk works again (the publisher reports it on
stats, status and ``<prefix>/error``). Events held in memory are lost if the process dies
before the disk recovers; that is the only window.

Schema version in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`). Files of schema 1 (written
before the version was recorded: ``user_version`` 0 and the ``events`` table) are migrated; any
other layout, a newer version or a file that is not SQLite is refused with
:class:`OutboxError` (the daemon prints one line and exits 2).

Size bound (``alarms.outbox_max_events``): when an event would exceed it, the oldest ``update``
events are deleted first; ``start`` and ``end`` events go only when no ``update`` is left.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from haloae.errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MEMORY_MAX = 10000  # events held in memory while the disk cannot take them
DEAD_MAX = 10000  # dead letters kept (the oldest go first)
RETRY_MIN_S, RETRY_MAX_S = 1.0, 5.0  # disk retry backoff (a failing INSERT costs nothing)
_EVENT_COLUMNS = {"seq", "kind", "topic", "payload", "created"}
_CREATE = ("""CREATE TABLE IF NOT EXISTS events (
               seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL,
               payload BLOB NOT NULL, created REAL NOT NULL)""",
           """CREATE TABLE IF NOT EXISTS dead_letters (
               seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
               created REAL NOT NULL, failed REAL NOT NULL, reason TEXT NOT NULL)""")


class OutboxError(UserError):
    """The outbox file cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class PendingEvent:
    seq: int  # > 0: a row of outbox.sqlite; < 0: held in memory (the disk failed)
    kind: str
    topic: str
    payload: bytes
    created: float = 0.0


class Outbox:
    """Thread-safe ledger of events waiting for a PUBACK, plus the dead letters."""

    def __init__(self, path: Path, max_events: int = 100000, memory_max: int = MEMORY_MAX,
                 on_problem: Callable[[str | None], None] | None = None):
        self.path, self.max_events, self.memory_max = Path(path), max_events, memory_max
        self.on_problem = on_problem  # called with the problem text, then None when it is over
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._count = 0  # rows in events
        self._memory: deque[PendingEvent] = deque()
        self._next_memory = -1
        self._acked: set[int] = set()  # delivered rows whose DELETE failed
        self._dead_rows: dict[int, str] = {}  # rows refused by the broker whose move failed
        self.dead_by_topic: dict[str, int] = {}
        self.dropped = 0
        self.problem: str | None = None
        self._retry_at, self._retry_s = 0.0, RETRY_MIN_S
        try:
            self._open()
        except sqlite3.OperationalError as err:  # full / read-only disk: run from memory
            self._db = None
            self._trouble("open", err)
        if self._count:
            log.info("outbox %s holds %d undelivered alarm event(s) from a previous run", self.path, self._count)

    # -- schema ------------------------------------------------------------------------------
    def _open(self) -> None:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=5.0)
        try:
            self._migrate(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._count = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            self.dead_by_topic = dict(db.execute("SELECT topic, COUNT(*) FROM dead_letters GROUP BY topic"))
        except sqlite3.OperationalError:
            db.close()
            raise
        except sqlite3.DatabaseError as err:  # not a database, corrupt
            db.close()
            raise OutboxError(f"{self.path} is not a usable alarm outbox ({err}); move it away (its pending "
                              "alarm events are lost) and start again") from None
        self._db = db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        if version == SCHEMA_VERSION:
            return self._check_columns(db, tables, version)
        if version > SCHEMA_VERSION:
            raise OutboxError(f"{self.path} has outbox schema {version}, written by a newer haloae (this one "
                              f"reads up to {SCHEMA_VERSION}): upgrade haloae, or move the file away (its "
                              "pending alarm events are lost)")
        if version != 0 or not tables <= {"events"}:
            raise OutboxError(f"{self.path} is not a haloae alarm outbox (schema {version}, tables "
                              f"{', '.join(sorted(tables)) or 'none'}); move it away or point state_dir elsewhere")
        if tables:
            self._check_columns(db, tables, 1)
            log.info("outbox %s: migrating schema 1 -> %d", self.path, SCHEMA_VERSION)
        db.execute("BEGIN IMMEDIATE")
        for sql in _CREATE:
            db.execute(sql)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")

    def _check_columns(self, db: sqlite3.Connection, tables: set[str], version: int) -> None:
        want = {"events", "dead_letters"} if version == SCHEMA_VERSION else {"events"}
        have = {r[1] for r in db.execute("PRAGMA table_info(events)")} if "events" in tables else set()
        if not want <= tables or not _EVENT_COLUMNS <= have:
            missing = sorted((want - tables) | {f"events.{c}" for c in _EVENT_COLUMNS - have})
            raise OutboxError(f"{self.path} claims outbox schema {version} but lacks {', '.join(missing)}: it was "
                              "written by something else; move it away (its content is lost) and start again")

    # -- writing -----------------------------------------------------------------------------
    def add(self, kind: str, topic: str, payload: bytes) -> int:
        """Keep one event (committed to disk when this returns, unless the disk fails: then in
        memory); returns its sequence number. Never raises for disk trouble."""
        now = time.time()
        with self._lock:
            if self._db is not None and not self._memory:
                try:
                    if self._count >= self.max_events:
                        self._make_room()
                    cur = self._db.execute("INSERT INTO events (kind, topic, payload, created) VALUES (?, ?, ?, ?)",
                                           (kind, topic, payload, now))
                    self._count += 1
                    return cur.lastrowid
                except sqlite3.Error as err:
                    self._trouble("write", err)
            return self._keep_in_memory(PendingEvent(0, kind, topic, payload, now))

    def _keep_in_memory(self, ev: PendingEvent) -> int:
        if len(self._memory) >= self.memory_max:
            victim = next((e for e in self._memory if e.kind == "update"), self._memory[0])
            self._memory.remove(victim)
            self.dropped += 1
            log.warning("alarm events held in memory reached %d (the outbox disk still fails): dropped the oldest "
                        "%s event", self.memory_max, victim.kind)
        seq, self._next_memory = self._next_memory, self._next_memory - 1
        self._memory.append(PendingEvent(seq, ev.kind, ev.topic, ev.payload, ev.created))
        return seq

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

    # -- reading and settling ------------------------------------------------------------------
    def pending(self, limit: int = 100, exclude: Iterable[int] = ()) -> list[PendingEvent]:
        """The oldest ``limit`` events not in ``exclude`` (in flight), in the order raised."""
        out: list[PendingEvent] = []
        with self._lock:
            skip = set(exclude) | self._acked | set(self._dead_rows)
            if self._db is not None and self._count:
                rows = self._read(limit + len(skip))
                out = [ev for ev in rows if ev.seq not in skip][:limit]
            out += [ev for ev in self._memory if ev.seq not in skip][:limit - len(out)]
        return out

    def _read(self, n: int) -> list[PendingEvent]:
        try:
            rows = self._db.execute("SELECT seq, kind, topic, payload, created FROM events ORDER BY seq LIMIT ?",
                                    (n,)).fetchall()
        except sqlite3.Error as err:
            self._trouble("read", err)
            return []
        return [PendingEvent(s, k, t, bytes(p), c) for s, k, t, p, c in rows]

    def delete(self, seqs: Iterable[int]) -> None:
        """Forget acknowledged events (unknown sequence numbers are ignored)."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            gone = set(s for s in seqs if s < 0)
            if gone:
                self._memory = deque(e for e in self._memory if e.seq not in gone)
            rows = [s for s in seqs if s > 0]
            if rows:
                self._acked.update(rows)  # not sent again, whatever the disk does
                self._settle()

    def dead_letter(self, ev: PendingEvent, reason: str) -> None:
        """Move a refused event to the dead letters (kept, never retried, counted by topic)."""
        with self._lock:
            self.dead_by_topic[ev.topic] = self.dead_by_topic.get(ev.topic, 0) + 1
            if ev.seq < 0:
                self._memory = deque(e for e in self._memory if e.seq != ev.seq)
                return
            self._dead_rows[ev.seq] = reason
            self._settle()

    def _settle(self) -> None:
        """Apply the pending deletes / dead-letter moves to the disk; on failure keep them for later."""
        if self._db is None or not (self._acked or self._dead_rows):
            return

        def work(db: sqlite3.Connection) -> int:
            now = time.time()
            for seq, reason in self._dead_rows.items():
                db.execute("INSERT OR REPLACE INTO dead_letters (seq, kind, topic, payload, created, failed, reason) "
                           "SELECT seq, kind, topic, payload, created, ?, ? FROM events WHERE seq = ?",
                           (now, reason, seq))
            gone = list(self._acked | set(self._dead_rows))
            n = db.execute(f"DELETE FROM events WHERE seq IN ({','.join('?' * len(gone))})", gone).rowcount
            if self._dead_rows:
                db.execute("DELETE FROM dead_letters WHERE seq NOT IN (SELECT seq FROM dead_letters "
                           "ORDER BY seq DESC LIMIT ?)", (DEAD_MAX,))
            return n

        n = self._transaction("delete", work)
        if n is None:
            return
        self._count -= n
        self._acked.clear()
        self._dead_rows.clear()

    def _transaction(self, action: str, work: Callable[[sqlite3.Connection], int]) -> int | None:
        """``work(db)`` in one transaction; on a disk error: roll back, report, None."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            result = work(self._db)
            self._db.execute("COMMIT")
            return result
        except sqlite3.Error as err:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._trouble(action, err)
            return None

    # -- disk trouble ---------------------------------------------------------------------------
    def _trouble(self, action: str, err: Exception) -> None:
        first = self.problem is None
        self.problem = (f"cannot {action} the alarm outbox {self.path}: {err}; alarm events are kept in memory "
                        f"(at most {self.memory_max}, lost if the daemon stops) until it works again; free space "
                        f"or fix the file system of {self.path.parent}")
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        if first:
            log.error("%s", self.problem)
            if self.on_problem is not None:
                self.on_problem(self.problem)
        else:
            log.debug("%s", self.problem)

    def maintain(self, inflight: Iterable[int] = ()) -> None:
        """Retry the disk (with backoff) while it fails: reopen, settle, store the events held in
        memory that are not in flight. Cheap when all is well; call it often."""
        with self._lock:
            if self.problem is None or time.monotonic() < self._retry_at:
                return
            if self._db is None:
                try:
                    self._open()
                except sqlite3.OperationalError as err:
                    return self._trouble("open", err)
            self._settle()
            if self._acked or self._dead_rows:
                return
            busy = set(inflight)
            move = [e for e in self._memory if e.seq not in busy]

            def work(db: sqlite3.Connection) -> int:
                for e in move:
                    db.execute("INSERT INTO events (kind, topic, payload, created) VALUES (?, ?, ?, ?)",
                               (e.kind, e.topic, e.payload, e.created))
                return len(move)

            if self._transaction("write", work) is None:
                return
            self._count += len(move)
            moved = {e.seq for e in move}
            self._memory = deque(e for e in self._memory if e.seq not in moved)
            if not self._memory:
                log.info("alarm outbox %s works again: %d event(s) from memory stored", self.path, len(move))
                self.problem, self._retry_s = None, RETRY_MIN_S
                if self.on_problem is not None:
                    self.on_problem(None)

    # -- state -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Events not yet acknowledged (on disk and in memory)."""
        with self._lock:
            return self._count - len(self._acked) - len(self._dead_rows) + len(self._memory)

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    @property
    def dead(self) -> int:
        return sum(self.dead_by_topic.values())

    def dead_letters(self, limit: int = 100) -> list[tuple[str, bytes, str]]:
        """``(topic, payload, reason)`` of the newest dead letters on disk."""
        with self._lock:
            if self._db is None:
                return []
            rows = self._db.execute("SELECT topic, payload, reason FROM dead_letters ORDER BY seq DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [(t, bytes(p), r) for t, p, r in rows]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._settle()
                self._db.close()
                self._db = None

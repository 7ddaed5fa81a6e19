"""systemd notify protocol (``Type=notify``, ``WatchdogSec=``) without the sdnotify package.

A message is one datagram of ``KEY=value`` lines to the AF_UNIX socket in ``$NOTIFY_SOCKET``
(a leading ``@`` means the Linux abstract namespace). Everything is a no-op when the variable
is unset (not run by systemd), so the daemon calls it unconditionally.

- ``READY=1`` is sent once, after the first frame is scored (not when the process starts).
- ``WATCHDOG=1`` is sent by :meth:`Notifier.frame_scored`, i.e. from the inference worker, at
  most every ``WATCHDOG_USEC / 4``: a pipeline that stops scoring frames stops feeding the
  watchdog and systemd restarts it. Never from a plain timer.
- :meth:`Notifier.idle_alive` covers the one case where no frame *can* flow: every camera is
  ``offline`` (being reopened with backoff) or ``ended``. The app calls it only then, and only
  while the inference worker's loop is alive, so an unplugged camera does not turn into a restart
  loop (which would hit systemd's start limit and leave the line unwatched when it comes back),
  while a hung pipeline still gets restarted.
- ``STATUS=`` lines say what the daemon does; ``STOPPING=1`` at shutdown.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


class Notifier:
    """Talks to systemd; safe to call from any thread."""

    def __init__(self, env: dict[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if enabled else None
        self.ready_sent = False
        self._last_ping = 0.0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``lines``; False if not under systemd or the send failed."""
        if not self.address:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError as e:
                log.warning("systemd notify to %r failed: %s", self.address, e)
                return False

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def frame_scored(self, status: str | None = None) -> None:
        """Call after each scored batch: READY=1 the first time, then WATCHDOG=1 when due."""
        if not self.address:
            return
        now = time.monotonic()
        if not self.ready_sent:
            self.ready_sent = True
            self._last_ping = now
            self.notify("READY=1", *([f"STATUS={status}"] if status else []))
            return
        self._ping(now)

    def idle_alive(self) -> None:
        """Feed the watchdog while no camera can deliver frames but the pipeline loop is alive."""
        if self.address:
            self._ping(time.monotonic())

    def _ping(self, now: float) -> None:
        if self.watchdog_s is None or now - self._last_ping < self.watchdog_s / 4:
            return
        self._last_ping = now
        self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

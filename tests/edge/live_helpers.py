"""Helpers for the live-view and metrics tests: a daemon running in this process, HTTP calls."""

from __future__ import annotations

import base64
import contextlib
import http.client
import threading
import time

from conftest import free_port
from mqtt_helpers import edge_config

from haloae.edge.app import EdgeApp


@contextlib.contextmanager
def running_daemon(tmp_path, broker, bundle, cameras, http=None, **sections):
    """An EdgeApp with ``cameras`` and an ``http`` section (a free port), run in a thread."""
    http = {"port": free_port(), **(http or {})}
    cfg = edge_config(tmp_path, broker.port, cameras=cameras, http=http,
                      model={"bundle": str(bundle), "threads": 1}, **sections)
    app = EdgeApp(cfg)
    app.prepare()
    thread = threading.Thread(target=app.run, name="daemon-under-test")
    thread.start()
    try:
        yield app
    finally:
        app.request_stop()
        thread.join(10)
        assert not thread.is_alive(), "the daemon did not stop"


def wait(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def request(app, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            auth: tuple[str, str] | None = None, timeout: float = 10.0):
    """``(status, headers, body)`` of one request to the daemon's HTTP server."""
    conn = http.client.HTTPConnection("127.0.0.1", app.cfg.http.port, timeout=timeout)
    hdrs = dict(headers or {})
    if auth is not None:
        hdrs["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()

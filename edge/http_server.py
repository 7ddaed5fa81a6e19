"""The daemon's HTTP server (``http:`` config; off by default): live view and ``/metrics``.

Standard library ``http.server.ThreadingHTTPServer``: no new dependency on a Jetson, threads like
the rest of the daemon (an MJPEG stream is one blocking thread writing parts; a handful of
viewers, capped by ``http.max_streams``), nothing to run beside it (an asyncio framework would
need its own event loop thread and brings more than two routes need).

Routes (``live_view``): ``/`` the page, ``/api/state`` its JSON, ``/camera/<id>/latest.jpg``,
``/camera/<id>/stream.mjpg`` (``multipart/x-mixed-replace``), ``POST /api/camera/<id>/threshold``
(JSON ``{"value": "0.62"}``, handed to the same code as an MQTT ``threshold/set``),
``POST /api/model`` (``{"path": "/var/lib/haloae/bundle-2"}``) and ``POST /api/camera/<id>/feedback``
(``{"event": "...", "label": "ok"}``): the payloads of ``model/set`` and ``feedback/set``, handed to
the same command path (202; the outcome follows on the command's ``state`` topic);
(``metrics``) ``/metrics``.

Security: bound to a loopback address by default, where the Host header must name a loopback
host (no DNS rebinding). Bound elsewhere the server needs a password (config check, exit 2) and
every request must carry it: basic auth (user ``http.username``) or ``Authorization: Bearer``.
A POST needs ``Content-Type: application/json`` (a cross-site form cannot send that without the
browser asking first, so another web page cannot move a threshold), and an ``Origin``, when
sent, must be this server.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from . import topics
from .config import ConfigError
from .config_surface import HttpConfig, is_loopback

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("liveview.html")
BOUNDARY = "haloae-frame"
MAX_BODY = 1024
_CAMERA_ROUTE = re.compile(r"^/camera/([A-Za-z0-9_-]{1,64})/(latest\.jpg|stream\.mjpg)$")
_THRESHOLD_ROUTE = re.compile(r"^/api/camera/([A-Za-z0-9_-]{1,64})/threshold$")
_FEEDBACK_ROUTE = re.compile(r"^/api/camera/([A-Za-z0-9_-]{1,64})/feedback$")
MODEL_ROUTE = "/api/model"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class Routes:
    """What the server serves; the handler only speaks HTTP."""

    def __init__(self, cfg: HttpConfig, cameras: list[str], liveview=None, metrics=None,
                 state: Callable[[], dict] | None = None, set_threshold: Callable[[str, bytes], str | None] | None = None,
                 command: Callable[[str | None, str, bytes], str | None] | None = None):
        self.cfg, self.cameras = cfg, set(cameras)
        self.liveview, self.metrics, self.state, self.set_threshold = liveview, metrics, state, set_threshold
        self.command = command  # model/set, <camera>/feedback/set: the MQTT command path
        self.password = cfg.password()
        self.page = PAGE.read_bytes() if cfg.live_view else b""


class HttpServer:
    """Binds at construction (a port in use is a ConfigError: exit 2), serves after ``start()``."""

    def __init__(self, routes: Routes):
        self.routes = routes
        cfg = routes.cfg
        handler = type("Handler", (_Handler,), {"routes": routes})
        server_cls = _V6Server if ":" in cfg.bind else ThreadingHTTPServer
        try:
            self.server = server_cls((cfg.bind, cfg.port), handler)
        except OSError as err:
            raise ConfigError(f"http: cannot listen on {cfg.bind}:{cfg.port} ({err.strerror or err}); choose another "
                              "http.port or stop what uses it") from None
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        what = " and ".join(w for w, on in (("live view", self.routes.cfg.live_view),
                                            ("/metrics", self.routes.cfg.metrics)) if on)
        log.info("HTTP: %s on http://%s:%d/%s", what, self.routes.cfg.bind, self.port,
                 "" if self.routes.password is None else " (password required)")

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    routes: Routes
    protocol_version = "HTTP/1.1"
    server_version = "haloae-edge"

    def log_message(self, fmt: str, *args) -> None:  # the journal is not an access log
        log.debug("HTTP %s: " + fmt, self.client_address[0], *args)

    # -- checks ------------------------------------------------------------------------------
    def _allowed(self) -> bool:
        r = self.routes
        if r.cfg.loopback and _host_name(self.headers.get("Host", "")) not in LOOPBACK_HOSTS:
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"this server answers only to a loopback host name\n")
            return False
        if r.password is not None and not self._authorised(r.password):
            self._send(HTTPStatus.UNAUTHORIZED, b"password required\n",
                       {"WWW-Authenticate": 'Basic realm="haloae-edge", charset="UTF-8"'})
            return False
        return True

    def _authorised(self, password: str) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode(), password.encode())
        if scheme.lower() == "basic":
            try:
                user, _, given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            user_ok = hmac.compare_digest(user.encode(), self.routes.cfg.username.encode())
            password_ok = hmac.compare_digest(given.encode(), password.encode())
            return user_ok and password_ok
        return False

    # -- answers -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc, allow_nan=False).encode(), content_type="application/json")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        r, path = self.routes, urlsplit(self.path).path
        try:
            if path == "/metrics" and r.metrics is not None:
                self._send(HTTPStatus.OK, r.metrics.render(), content_type=r.metrics.content_type)
            elif r.liveview is None:
                self._send(HTTPStatus.NOT_FOUND, b"not found (http.live_view is off)\n")
            elif path == "/":
                self._send(HTTPStatus.OK, r.page, content_type="text/html; charset=utf-8",
                           headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                    "script-src 'self' 'unsafe-inline'; img-src 'self'"})
            elif path == "/api/state":
                self._json(HTTPStatus.OK, r.state())
            elif (m := _CAMERA_ROUTE.match(path)) and m.group(1) in r.cameras:
                (self._latest if m.group(2) == "latest.jpg" else self._stream)(m.group(1))
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the viewer went away
        except Exception:  # noqa: BLE001 - a bug answering one request: say so, serve the next
            log.exception("HTTP: GET %s failed", path)
            self.close_connection = True
            try:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error (see the daemon's log)\n")
            except OSError:
                pass

    def _latest(self, camera: str) -> None:
        got = self.routes.liveview.jpeg(camera)
        if got is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"no frame of camera {camera} inspected yet\n".encode(),
                       {"Retry-After": "1"})
        else:
            self._send(HTTPStatus.OK, got[1], content_type="image/jpeg")

    def _stream(self, camera: str) -> None:
        lv = self.routes.liveview
        if not lv.open_stream():
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{lv.cfg.http.max_streams} viewers already (http.max_streams)\n"
                       .encode(), {"Retry-After": "5"})
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            period, seq, next_t = 1.0 / lv.cfg.http.stream_fps, 0, 0.0
            while not lv.closed:
                wait = next_t - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                seq_now = lv.wait_new(camera, seq, timeout=1.0)
                if lv.closed:
                    break
                if seq_now == seq:
                    continue  # no new frame within a second: keep waiting
                got = lv.jpeg(camera)
                if got is None:
                    continue
                seq, data = got
                next_t = time.monotonic() + period
                self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                                 .encode() + data + b"\r\n")
                self.wfile.flush()
        finally:
            lv.close_stream()

    def do_POST(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        r, path = self.routes, urlsplit(self.path).path
        thr, fb = _THRESHOLD_ROUTE.match(path), _FEEDBACK_ROUTE.match(path)
        cam = (thr or fb).group(1) if (thr or fb) else None
        known = (thr is not None or (r.command is not None and (fb is not None or path == MODEL_ROUTE)))
        if r.liveview is None or not known or (cam is not None and cam not in r.cameras):
            self._send(HTTPStatus.NOT_FOUND, b"not found\n")
            return
        body = self._json_body()
        if body is None:
            return
        if fb is not None or path == MODEL_ROUTE:  # the command's JSON goes on as its payload
            name = "feedback" if fb is not None else "model"
            error = r.command(cam, name, body)
            if error is None:
                topic = f"{cam}/feedback" if cam else "model"
                self._json(HTTPStatus.ACCEPTED, {"accepted": name, "outcome_on": f"{topic}/{topics.STATE}"})
            else:
                self._json(HTTPStatus.BAD_REQUEST, {"error": error})
            return
        try:
            value = json.loads(body)["value"]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": 'the body must be {"value": "0.62"}'})
            return
        error = r.set_threshold(cam, str(value).encode())
        if error is None:
            self._json(HTTPStatus.OK, {"camera": cam, "threshold": str(value)})
        else:
            self._json(HTTPStatus.BAD_REQUEST, {"error": error})

    def _json_body(self) -> bytes | None:
        """The request's JSON body (same-origin, 1..MAX_BODY bytes), else None after an error reply."""
        if self.headers.get_content_type() != "application/json":
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON: Content-Type: application/json"})
            return None
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host", ""):
            self._json(HTTPStatus.FORBIDDEN, {"error": f"cross-origin request from {origin} refused"})
            return None
        try:
            size = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            size = -1
        if not 0 < size <= MAX_BODY:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"a JSON body of 1..{MAX_BODY} bytes is needed"})
            return None
        return self.rfile.read(size)


def _host_name(host: str) -> str:
    """``127.0.0.1:8080`` -> ``127.0.0.1``, ``[::1]:8080`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


__all__ = ["HttpServer", "Routes", "is_loopback"]

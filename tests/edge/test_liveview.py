"""The live view (issue 14, "Done when"): the daemon with a synthetic camera and the live view,
the page in real headless Chromium (Debian ``chromium`` + ``chromium-driver`` via Selenium), an
MJPEG frame arriving, the threshold slider moving the retained ``threshold/state`` on a real
mosquitto; and the HTTP rules: nothing encoded without a viewer, password, Host, JSON-only POST."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from live_helpers import request, running_daemon, wait
from mqtt_helpers import Subscriber
from toy_bundle import make_toy_bundle

from haloae.edge.config import ConfigError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PREFIX = "haloae/n1"


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver: run scripts/test (it installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: scripts/setup --dev installs it")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM  # the system browser: Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,860", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_page_in_chromium_shows_the_stream_and_the_slider_sets_the_threshold(tmp_path, broker, tiny_bundle):
    zones = {"size": [224, 224], "border_px": 4, "polygons": [[[150, 20], [215, 20], [215, 70], [150, 70]]]}
    cameras = [{"id": "cam0", "source": "synthetic", "fps": 4, "seed": 3, "defect_every": 2, "threshold": 0.75,
                "roi": [16, 16, 224, 224], "ignore_zones": zones},
               {"id": "cam1", "source": "synthetic", "fps": 4, "seed": 5, "defect_every": 2, "threshold": 0.75}]
    sub = Subscriber(broker.port, [f"{PREFIX}/cam0/threshold/state"])
    with running_daemon(tmp_path, broker, tiny_bundle, cameras, http={"live_view": True}) as app:
        sub.wait_for(lambda m: m and m[-1][1] == b"0.75")
        driver = _browser()
        try:
            driver.get(f"http://127.0.0.1:{app.cfg.http.port}/")
            wait(lambda: driver.execute_script(
                "const i = document.querySelector('#cam-cam0 img'); return i && i.complete && i.naturalWidth > 0;"),
                30, "an MJPEG frame in the page")
            assert app.surface.liveview.encoded >= 1
            wait(lambda: app.surface.liveview.viewers == 2, 10, "one MJPEG viewer per camera")
            wait(lambda: "fps" in driver.find_element("css selector", "#cam-cam0 .row").text, 10, "the camera's state")
            wait(lambda: app.surface.liveview.encoded >= 3, 30, "more MJPEG frames")  # the stream goes on
            defect = lambda: (r := app.surface.liveview.latest("cam1")) is not None and r.anomalous  # noqa: E731
            wait(defect, 40, "a defective frame of cam1 on screen")
            wait(lambda: "defect" in driver.find_element("css selector", "#cam-cam1 .row").text, 5, "its verdict")
            shot = tmp_path / "liveview.png"
            driver.save_screenshot(str(shot))
            img = cv2.imread(str(shot))
            assert img is not None and img.shape[1] >= 1000 and img.std() > 10  # a picture, not a blank page
            if os.environ.get("HALOAE_SCREENSHOT"):  # the docs picture: HALOAE_SCREENSHOT=docs/images/liveview.png
                shutil.copy(shot, os.environ["HALOAE_SCREENSHOT"])
            slider = driver.find_element("css selector", "#cam-cam0 input[type=range]")
            assert float(slider.get_attribute("value")) == pytest.approx(0.75)
            from selenium.webdriver.common.keys import Keys

            slider.click()  # a click lands in the middle of the track (about 1.0): a change too
            for _ in range(3):
                slider.send_keys(Keys.ARROW_RIGHT)
            final = float(slider.get_attribute("value"))
            assert final != pytest.approx(0.75)
            want = str(float(f"{final:.2f}")).encode()
            sub.wait_for(lambda m: m[-1][1] == want, timeout=15)
            wait(lambda: "in force" in driver.find_element("css selector", "#cam-cam0 .msg").text, 10, "the page's answer")
        finally:
            driver.quit()
        assert app.inference.threshold("cam0") == pytest.approx(final, abs=1e-9)
    late = Subscriber(broker.port, [f"{PREFIX}/cam0/threshold/state"])  # retained: a new subscriber gets it
    got = late.wait_for(lambda m: len(m) >= 1)
    late.close()
    sub.close()
    assert got[0][1] == want and got[0][2] is True


def test_http_rules_and_no_jpeg_without_a_viewer(tmp_path, broker, monkeypatch):
    bundle = make_toy_bundle(tmp_path / "bundle")
    monkeypatch.setenv("HALOAE_HTTP_PASSWORD", "s3cret")  # a password set is a password required
    cameras = [{"id": "cam0", "source": "synthetic", "fps": 20}]
    errors = Subscriber(broker.port, [f"{PREFIX}/error"])
    with running_daemon(tmp_path, broker, bundle, cameras, http={"live_view": True, "max_streams": 1}) as app:
        lv, auth = app.surface.liveview, ("haloae", "s3cret")
        wait(lambda: app.stats.inspected("cam0") >= 20, 20, "20 inspected frames")
        assert lv.encoded == 0, "a JPEG was encoded without anybody watching"
        assert request(app, "GET", "/")[0] == 401
        assert request(app, "GET", "/", auth=("haloae", "wrong"))[0] == 401
        status, headers, page = request(app, "GET", "/", auth=auth)
        assert status == 200 and b"HaloAE Edge" in page and headers["Content-Type"].startswith("text/html")
        assert request(app, "GET", "/metrics", auth=auth)[0] == 404  # http.metrics is off
        status, headers, jpg = request(app, "GET", "/camera/cam0/latest.jpg",
                                       headers={"Authorization": "Bearer s3cret"})
        img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and img.shape[:2] == (360, 360)
        assert lv.encoded == 1
        assert request(app, "GET", "/camera/nocam/latest.jpg", auth=auth)[0] == 404
        assert request(app, "GET", "/", auth=auth, headers={"Host": "evil.example:80"})[0] == 421  # DNS rebinding
        state = json.loads(request(app, "GET", "/api/state", auth=auth)[2])
        assert state["cameras"][0]["id"] == "cam0" and state["cameras"][0]["history"]
        post = "/api/camera/cam0/threshold"
        js = {"Content-Type": "application/json"}
        assert request(app, "POST", post, b"0.6", {"Content-Type": "text/plain"}, auth)[0] == 415
        assert request(app, "POST", post, b'{"value": "0.6"}', {**js, "Origin": "http://evil.example"}, auth)[0] == 403
        status, _, body = request(app, "POST", post, b'{"value": "1e-1"}', js, auth)
        assert status == 400 and "plain decimal number" in json.loads(body)["error"]
        refused = errors.wait_for(lambda m: m)  # the same path as MQTT: the refusal is on <prefix>/error
        assert json.loads(refused[0][1])["topic"] == f"{PREFIX}/cam0/threshold/set"
        status, _, body = request(app, "POST", post, b'{"value": 0.62}', js, auth)
        assert status == 200 and app.inference.threshold("cam0") == pytest.approx(0.62)
        # one MJPEG viewer allowed: the second gets 503
        conn = http.client.HTTPConnection("127.0.0.1", app.cfg.http.port, timeout=10)
        conn.request("GET", "/camera/cam0/stream.mjpg", headers={"Authorization": "Bearer s3cret"})
        resp = conn.getresponse()
        assert resp.status == 200 and "multipart/x-mixed-replace" in resp.getheader("Content-Type")
        part = resp.read(4096)
        assert part.startswith(b"--haloae-frame\r\nContent-Type: image/jpeg")
        assert request(app, "GET", "/camera/cam0/stream.mjpg", auth=auth)[0] == 503
        conn.close()
    errors.close()


def test_port_in_use_and_missing_password_are_config_errors(tmp_path, broker):
    import socket

    from haloae.edge.app import EdgeApp
    from mqtt_helpers import edge_config

    make_toy_bundle(tmp_path / "bundle")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = edge_config(tmp_path, broker.port, http={"metrics": True, "port": busy.getsockname()[1]})
        app = EdgeApp(cfg)
        with pytest.raises(ConfigError, match=r"http: cannot listen on 127.0.0.1:\d+ .*choose another http.port"):
            app.prepare()
        app.publisher.outbox.close()
    assert Path(tmp_path / "bundle").is_dir()


def test_page_commands_take_the_mqtt_command_path(tmp_path, broker):
    """The page's "load model" and feedback buttons: POSTs handed to the same code as
    ``model/set`` and ``<camera>/feedback/set``; a refusal answers at once, an accepted command
    reports its outcome on the retained state topic, and the old model keeps inspecting."""
    bundle = make_toy_bundle(tmp_path / "bundle")
    cameras = [{"id": "cam0", "source": "synthetic", "fps": 20}]
    sub = Subscriber(broker.port, [f"{PREFIX}/model/state", f"{PREFIX}/cam0/feedback/state"])
    with running_daemon(tmp_path, broker, bundle, cameras, http={"live_view": True}) as app:
        wait(lambda: app.stats.inspected("cam0") >= 5, 20, "5 inspected frames")
        js = {"Content-Type": "application/json"}
        page = request(app, "GET", "/")[2]
        assert b"load model" in page and b"false alarm (ok)" in page
        status, _, body = request(app, "POST", "/api/model", b'{"path": "bundles/v2"}', js)
        assert status == 400 and "relative path" in json.loads(body)["error"]
        model = app.inference.model_id
        nowhere = json.dumps({"path": str(tmp_path / "nowhere")}).encode()
        status, _, body = request(app, "POST", "/api/model", nowhere, js)
        assert status == 202 and json.loads(body)["outcome_on"] == "model/state"
        states = lambda: [json.loads(p) for p in sub.on(f"{PREFIX}/model/state")]  # noqa: E731
        wait(lambda: any(s["state"] == "refused" for s in states()), 20, "model/state refused")
        assert "not a folder" in [s for s in states() if s["state"] == "refused"][-1]["error"]
        n = app.stats.inspected("cam0")
        wait(lambda: app.stats.inspected("cam0") > n + 5, 20, "inspection going on")
        assert app.inference.model_id == model
        post = "/api/camera/cam0/feedback"
        status, _, body = request(app, "POST", post, b'{"frame_id": 3, "label": "maybe"}', js)
        assert status == 400 and "label" in json.loads(body)["error"]
        status, _, _ = request(app, "POST", post, b'{"frame_id": 999999, "label": "ok"}', js)
        assert status == 202
        fb = lambda: [json.loads(p) for p in sub.on(f"{PREFIX}/cam0/feedback/state")]  # noqa: E731
        wait(lambda: fb() and fb()[-1]["state"] == "not_found", 20, "feedback/state not_found")
        assert request(app, "POST", "/api/camera/nocam/feedback", b'{"label": "ok"}', js)[0] == 404
    sub.close()

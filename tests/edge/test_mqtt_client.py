"""MqttClient against a real mosquitto: availability, last will, refused credentials (mqtt_client.py)."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import CHILD_ENV, Broker
from mqtt_helpers import Subscriber

from haloae.edge.config import MqttConfig
from haloae.edge.mqtt_client import MqttClient

AVAIL = "haloae/n1/available"


def _cfg(port, **kw):
    return MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=1.0, keepalive=10, **kw)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_online_retained_on_connect_and_offline_on_clean_stop(broker, protocol):
    c = MqttClient(_cfg(broker.port, protocol=protocol), "haloae/n1", f"test-{protocol}")
    c.start()
    assert c.wait_connected(10)
    c.stop(timeout=2.0)
    assert not c.connected
    # a subscriber arriving later sees the retained value "offline", published by the clean stop
    # itself (Home Assistant reads it as unavailable; the camera statuses say it was a clean stop)
    sub = Subscriber(broker.port, [AVAIL])
    msgs = sub.wait_for(lambda m: len(m) >= 1)
    sub.close()
    assert msgs[0] == (AVAIL, b"offline", True)


def test_online_is_published_on_every_connect(broker):
    c = MqttClient(_cfg(broker.port), "haloae/n1", "t-online")
    c.start()
    assert c.wait_connected(10)
    # overwrite the retained value: after the bounce only the daemon can make it "online" again
    other = MqttClient(_cfg(broker.port), "haloae/other", "t-other")
    other.start()
    assert other.wait_connected(10)
    other.publish(AVAIL, b"unknown", qos=1, retain=True).wait_for_publish(5)
    other.stop(final=None)
    broker.stop()
    broker.start()
    deadline = time.monotonic() + 15
    while c.connects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.connects >= 2
    sub = Subscriber(broker.port, [AVAIL])
    sub.wait_for(lambda m: any(p == b"online" for _, p, _ in m))  # retained, or live if it raced us
    sub.close()
    c.stop()


CHILD = textwrap.dedent("""
    import sys, time
    from haloae.edge.config import MqttConfig
    from haloae.edge.mqtt_client import MqttClient
    c = MqttClient(MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), keepalive=10), "haloae/n1", "child")
    c.start()
    if c.wait_connected(10):
        print("connected", flush=True)
    time.sleep(60)
""")


def test_last_will_offline_after_sigkill(broker):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(broker.port)], stdout=subprocess.PIPE, text=True,
                             env=CHILD_ENV)
    try:
        assert child.stdout.readline().strip() == "connected"
        sub = Subscriber(broker.port, [AVAIL])
        # retained when it was stored before we subscribed, live when it arrives after: the
        # child's publish leaves in its network loop, so "connected" may print first
        sub.wait_for(lambda m: any(t == AVAIL and p == b"online" for t, p, _ in m))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        msgs = sub.wait_for(lambda m: any(p == b"offline" for t, p, _ in m), timeout=10)
        sub.close()
        assert msgs[-1][:2] == (AVAIL, b"offline")
    finally:
        child.kill()
        child.wait()


NO_PASSWD = shutil.which("mosquitto_passwd") is None


@pytest.mark.skipif(NO_PASSWD, reason="mosquitto_passwd is missing (Debian package: mosquitto)")
def test_wrong_credentials_are_refused_with_one_clear_line_and_backoff(tmp_path, caplog):
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "daemon", "right"], check=True,
                   capture_output=True)
    b = Broker(tmp_path / "b", extra_conf=f"allow_anonymous false\npassword_file {pwfile}\n").start()
    port = b.port
    try:
        os.environ["HALOAE_TEST_PW"] = "wrong"
        cfg = _cfg(port, username="daemon", password_env="HALOAE_TEST_PW")
        c = MqttClient(cfg, "haloae/n1", "t-refused")
        caplog.set_level(logging.DEBUG, logger="haloae.edge.mqtt_client")
        cpu0 = time.process_time()
        c.start()
        time.sleep(3.0)
        cpu = time.process_time() - cpu0
        assert not c.connected
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors                      # one clear line, repeats go to DEBUG
        assert "refused" in errors[0] and "mqtt.username" in errors[0] and "HALOAE_MQTT_PASSWORD" in errors[0]
        assert re.search(r"reason code 0x8[67]", errors[0]), errors[0]  # the broker's code, not just a word
        # backoff 0.2, 0.4, 0.8, 1.0, ... -> about 4-6 attempts in 3 s, not thousands
        assert 2 <= c.attempts_failed <= 8, c.attempts_failed
        assert cpu < 1.0, f"{cpu:.2f} s of CPU in 3 s: busy loop?"
        c.stop(timeout=1.0)
        # the right password connects
        os.environ["HALOAE_TEST_PW"] = "right"
        ok = MqttClient(cfg, "haloae/n1", "t-right")
        ok.start()
        assert ok.wait_connected(10)
        ok.stop()
    finally:
        os.environ.pop("HALOAE_TEST_PW", None)
        b.stop()


def test_unreachable_broker_is_logged_once_and_retried(caplog):
    from conftest import free_port
    caplog.set_level(logging.DEBUG, logger="haloae.edge.mqtt_client")
    c = MqttClient(_cfg(free_port()), "haloae/n1", "t-down")
    c.start()
    time.sleep(1.5)
    c.stop(timeout=1.0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "unreachable" in errors[0] and "ConnectionRefusedError" in errors[0], errors
    assert c.attempts_failed >= 2


def test_a_message_queued_while_disconnected_is_acknowledged_after_the_connect(broker):
    """paho's is_published() raises for such a message (rc NO_CONN) although paho sends it at
    the connect; the alarm sender must see its PUBACK, not an exception (it used to loop)."""
    c = MqttClient(_cfg(broker.port), "haloae/n1", "t-queued")
    info = c.publish("haloae/n1/cam0/alarm", b"{}", qos=1)  # not connected yet
    assert info.rc != 0 and MqttClient.acknowledged(info) is False
    with pytest.raises(RuntimeError):
        info.is_published()
    c.start()
    deadline = time.monotonic() + 10
    while not MqttClient.acknowledged(info) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert MqttClient.acknowledged(info)
    c.stop()

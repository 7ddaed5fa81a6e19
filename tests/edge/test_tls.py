"""TLS + password file + ACL on a real mosquitto: the daemon connects and stays in its prefix."""

import datetime
import ipaddress
import logging
import shutil
import subprocess
import time

import pytest
from conftest import Broker, free_port
from mqtt_helpers import Subscriber

from haloae.edge.config import MqttConfig, TLSConfig
from haloae.edge.mqtt_client import MqttClient

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, ca=False, san=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(folder, name, cert, key):
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))


def make_pki(folder, ca_name="haloae-test-ca"):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write(folder, "ca", ca, ca_key)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, ca_name, ca_key,
                san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    _write(folder, "server", srv, srv_key)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    _write(folder, "client", _cert("haloae-n1", cli_key, ca_name, ca_key), cli_key)
    return folder


@pytest.fixture
def tls_broker(tmp_path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is missing (Debian package: mosquitto)")
    pki = make_pki(tmp_path / "pki")
    pw = tmp_path / "passwd"
    for i, (user, password) in enumerate([("daemon", "d-secret"), ("monitor", "m-secret")]):
        subprocess.run(["mosquitto_passwd", "-b", *([] if i else ["-c"]), str(pw), user, password],
                       check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text("user daemon\ntopic readwrite haloae/n1/#\n\nuser monitor\ntopic read haloae/#\n")
    port = free_port()
    conf = (f"listener {port} 127.0.0.1\ncafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\n"
            f"require_certificate true\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n")
    b = Broker(tmp_path / "broker", extra_conf=conf, port=port).start()
    yield b, pki
    b.stop()


def _daemon_cfg(port, pki, **kw):
    return MqttConfig(host="127.0.0.1", port=port, username="daemon", password_env="HALOAE_TLS_TEST_PW",
                      tls=TLSConfig(ca=pki / "ca.crt", cert=pki / "client.crt", key=pki / "client.key"),
                      reconnect_min_s=0.2, reconnect_max_s=1.0, **kw)


def test_daemon_connects_with_tls_and_credentials_and_stays_in_its_acl(tls_broker, monkeypatch):
    broker, pki = tls_broker
    monkeypatch.setenv("HALOAE_TLS_TEST_PW", "d-secret")
    mon = Subscriber(broker.port, ["haloae/#"], username="monitor", password="m-secret", tls_ca=pki / "ca.crt",
                     tls_cert=pki / "client.crt", tls_key=pki / "client.key")
    mon.wait_subscribed()
    c = MqttClient(_daemon_cfg(broker.port, pki), "haloae/n1", "haloae-n1")
    c.start()
    assert c.wait_connected(10)
    c.publish("haloae/n2/cam0/alarm", b"outside my prefix", qos=1).wait_for_publish(5)
    c.publish("haloae/n1/cam0/result", b"inside", qos=1).wait_for_publish(5)
    msgs = mon.wait_for(lambda m: ("haloae/n1/cam0/result", b"inside", False) in m)
    assert ("haloae/n1/available", b"online", True) in msgs or ("haloae/n1/available", b"online", False) in msgs
    assert not [t for t, _, _ in msgs if t.startswith("haloae/n2/")]   # the ACL dropped it
    c.stop()
    mon.close()


def test_anonymous_and_wrong_password_clients_are_refused(tls_broker):
    broker, pki = tls_broker
    anon = Subscriber(broker.port, ["haloae/#"], tls_ca=pki / "ca.crt", tls_cert=pki / "client.crt",
                      tls_key=pki / "client.key")
    wrong = Subscriber(broker.port, ["haloae/#"], username="monitor", password="nope", tls_ca=pki / "ca.crt",
                       tls_cert=pki / "client.crt", tls_key=pki / "client.key")
    deadline = time.monotonic() + 10
    while not (anon.refused and wrong.refused) and time.monotonic() < deadline:
        time.sleep(0.05)
    anon.close()
    wrong.close()
    assert anon.refused and not anon.subscribed.is_set()
    assert wrong.refused and not wrong.subscribed.is_set()


def test_a_broker_certificate_from_another_ca_is_reported(tls_broker, tmp_path, monkeypatch, caplog):
    broker, pki = tls_broker
    other = make_pki(tmp_path / "other", ca_name="someone-else")
    monkeypatch.setenv("HALOAE_TLS_TEST_PW", "d-secret")
    caplog.set_level(logging.ERROR, logger="haloae.edge.mqtt_client")
    cfg = _daemon_cfg(broker.port, pki).model_copy(update={"tls": TLSConfig(ca=other / "ca.crt", cert=pki / "client.crt",
                                                                           key=pki / "client.key")})
    c = MqttClient(cfg, "haloae/n1", "haloae-n1")
    c.start()
    time.sleep(1.0)
    c.stop(timeout=1.0)
    assert not c.connects
    (line,) = [r.getMessage() for r in caplog.records]
    assert "certificate verify failed" in line and "mqtt.tls.ca" in line

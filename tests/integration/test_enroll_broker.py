"""What `enroll` and `revoke` write, loaded into a real Mosquitto: each node reaches its own topics
and the broadcast only, a wrong password is refused, and a revoked node cannot connect again.

Mosquitto acknowledges a denied publish (PUBACK) and then drops it, and grants a denied
subscription; so every check here is on what arrives. A node's messages reach a subscriber in
the order it sent them, so a permitted message sent after the denied ones marks the point by
which a denied one would have arrived.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from fsl_edge import protocol
from fsl_edge.deploy import pki
from fsl_edge.enroll import LocalStore, Site, enroll_site, revoke

from .secure_broker import Broker, broker_tls, mosquitto_on


pytestmark = pytest.mark.integration
RUN = "trial"
COORDINATOR_PASSWORD = "coordinator-secret"
TIMEOUT_S = 10.0
GRACE_S = 0.5  # how long a message that crosses connections gets to arrive before we say it won't


class Session:
    """A connected paho client (MQTT 3.1.1, QoS 1) that queues what it receives."""

    def __init__(self, client: mqtt.Client):
        self.client = client
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.suback = threading.Event()
        client.on_message = lambda c, u, msg: self.inbox.put((msg.topic, msg.payload))
        client.on_subscribe = lambda c, u, mid, codes, props: self.suback.set()

    def subscribe(self, *topics: str) -> None:
        self.suback.clear()
        self.client.subscribe([(t, protocol.QOS) for t in topics])
        assert self.suback.wait(TIMEOUT_S), f"no SUBACK for {topics}"

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish and wait for the broker's PUBACK (which it sends for denied publishes too)."""
        info = self.client.publish(topic, payload, qos=protocol.QOS)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def next(self, timeout: float = TIMEOUT_S) -> tuple[str, bytes] | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None


def connect(broker: Broker, user: str, password: str, cert: tuple[str, str] | None | str = "own"
            ) -> tuple[mqtt.Client, mqtt.ReasonCode | str]:
    """A client that sent CONNECT as user; returns it with the CONNACK's reason code, or with
    the TLS or connection error that came instead. `cert`: the client certificate files to
    show ("own": the user's, if it has one; None: none).

    The network loop runs in this thread until the CONNACK: paho's background loop would retry a
    refused connection after a backoff, which a refusal test only waits on.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    if broker.tls is not None:
        files = broker.tls.certs.get(user) if cert == "own" else cert
        client.tls_set(ca_certs=str(broker.tls.ca_file), certfile=files and files[0],
                       keyfile=files and files[1])
    result: list[mqtt.ReasonCode | str] = []
    client.on_connect = lambda c, userdata, flags, reason_code, properties: result.append(reason_code)
    try:
        client.connect("localhost" if broker.tls else broker.host, broker.port, keepalive=30)
        deadline = time.monotonic() + TIMEOUT_S
        while not result and time.monotonic() < deadline:
            if client.loop(timeout=0.1) not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                result.append("connection lost before CONNACK")
    except (OSError, ssl.SSLError) as e:  # a TLS handshake the broker refused
        result.append(f"{type(e).__name__}: {e}")
    if not result:
        client.disconnect()
        raise TimeoutError(f"no CONNACK for {user} within {TIMEOUT_S} s:\n{broker.log()}")
    return client, result[0]


def admitted(code: mqtt.ReasonCode | str) -> bool:
    return not isinstance(code, str) and not code.is_failure


@contextlib.contextmanager
def session(broker: Broker, user: str, password: str, kind: type[Session] | None = None
            ) -> Iterator[Session]:
    """A logged-in client, wrapped as `kind` (default Session), disconnected afterwards."""
    client, code = connect(broker, user, password)
    assert admitted(code), f"{user} was refused: {code}"
    client.loop_start()
    try:
        yield (kind or Session)(client)
    finally:
        client.disconnect()
        client.loop_stop()


def refused(broker: Broker, user: str, password: str, cert: tuple[str, str] | None | str = "own") -> bool:
    client, code = connect(broker, user, password, cert)
    client.disconnect()
    return not admitted(code)


@pytest.fixture(params=["tls", "mtls"])
def federation(request, tmp_path: Path):
    """A node store holding the coordinator's user (as deploy writes it) and nodes alice and bob,
    enrolled with bundles, and a Mosquitto over TLS that loads its password and ACL files; with
    mutual TLS (`mtls`) the broker also demands a certificate from its CA, which each node's
    bundle holds."""
    tls = broker_tls(tmp_path, require_certificate=request.param == "mtls")
    store = LocalStore(tmp_path / "auth")
    store.folder.mkdir()
    mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([mosquitto_passwd, "-c", "-b", str(store.folder / "passwd"), "coordinator",
                    COORDINATOR_PASSWORD], check=True)
    (store.folder / "acl").write_text("user coordinator\ntopic readwrite fsl/#\n")
    site = Site(broker="localhost:8883", ca_pem=tls.ca.cert, run_id=RUN)
    client_ca = tls.ca if tls.require_certificate else None
    nodes = {name: enroll_site(store, name, site, tmp_path / f"{name}-bundle", client_ca)
             for name in ("alice", "bob")}
    if tls.require_certificate:
        coordinator = pki.issue_client(tls.ca, "coordinator")
        (tmp_path / "coordinator.crt").write_bytes(coordinator.cert)
        (tmp_path / "coordinator.key").write_bytes(coordinator.key)
        tls.certs = {"coordinator": (str(tmp_path / "coordinator.crt"), str(tmp_path / "coordinator.key")),
                     **{name: (str(tmp_path / f"{name}-bundle" / "client.crt"),
                               str(tmp_path / f"{name}-bundle" / "client.key")) for name in nodes}}
    with mosquitto_on(store.folder, tmp_path, tls) as broker:
        yield broker, store, nodes


def test_a_node_uses_its_own_topics_and_the_broadcast(federation):
    broker, _, nodes = federation
    alice = nodes["alice"]
    with session(broker, "coordinator", COORDINATOR_PASSWORD) as coord, \
            session(broker, "alice", alice.password) as node:
        coord.subscribe(protocol.topic_all_up(RUN), protocol.topic_all_status(RUN))
        node.subscribe(protocol.topic_down(RUN, "alice"), protocol.topic_broadcast(RUN))

        node.publish(protocol.topic_up(RUN, "alice"), b"activation")
        assert coord.next() == (protocol.topic_up(RUN, "alice"), b"activation")
        node.publish(protocol.topic_status(RUN, "alice"), protocol.STATUS_ONLINE)
        assert coord.next() == (protocol.topic_status(RUN, "alice"), protocol.STATUS_ONLINE)

        coord.publish(protocol.topic_down(RUN, "alice"), b"gradient")
        assert node.next() == (protocol.topic_down(RUN, "alice"), b"gradient")
        coord.publish(protocol.topic_broadcast(RUN), b"round 1")
        assert node.next() == (protocol.topic_broadcast(RUN), b"round 1")

        # its link probe at join (fsl_edge.profile): it reads back what it writes there
        node.subscribe(protocol.topic_probe(RUN, "alice"))
        node.publish(protocol.topic_probe(RUN, "alice"), b"probe")
        assert node.next() == (protocol.topic_probe(RUN, "alice"), b"probe")


def test_what_a_node_publishes_outside_its_topics_never_arrives(federation):
    broker, _, nodes = federation
    with session(broker, "coordinator", COORDINATOR_PASSWORD) as coord, \
            session(broker, "alice", nodes["alice"].password) as alice:
        coord.subscribe("fsl/#")
        for topic in (protocol.topic_up(RUN, "bob"), protocol.topic_down(RUN, "bob"),
                      protocol.topic_status(RUN, "bob"), protocol.topic_probe(RUN, "bob"),
                      protocol.topic_broadcast(RUN),
                      protocol.topic_down(RUN, "alice"), "fsl/elsewhere"):
            alice.publish(topic, b"forged")  # acknowledged, then dropped by the broker
        alice.publish(protocol.topic_up(RUN, "alice"), b"marker")
        assert coord.next() == (protocol.topic_up(RUN, "alice"), b"marker")
        assert coord.next(GRACE_S) is None


def test_a_node_cannot_read_another_nodes_topics(federation):
    broker, _, nodes = federation
    with session(broker, "coordinator", COORDINATOR_PASSWORD) as coord, \
            session(broker, "alice", nodes["alice"].password) as alice, \
            session(broker, "bob", nodes["bob"].password) as bob:
        bob.subscribe(protocol.topic_down(RUN, "bob"))
        # Mosquitto 2 grants these subscriptions and then withholds every message on them.
        alice.subscribe(protocol.topic_down(RUN, "bob"), protocol.topic_all_up(RUN), "fsl/#")
        coord.publish(protocol.topic_down(RUN, "bob"), b"for bob")
        assert bob.next() == (protocol.topic_down(RUN, "bob"), b"for bob")
        bob.publish(protocol.topic_up(RUN, "bob"), b"from bob")
        bob.publish(protocol.topic_probe(RUN, "bob"), b"bob's probe")
        assert alice.next(GRACE_S) is None


def test_a_wrong_password_or_unknown_user_is_refused(federation):
    broker, _, nodes = federation
    assert refused(broker, "alice", nodes["bob"].password)
    assert refused(broker, "alice", "")
    assert refused(broker, "mallory", nodes["alice"].password)
    assert not refused(broker, "alice", nodes["alice"].password)


def test_without_tls_or_trusting_another_ca_nobody_gets_in(federation, tmp_path):
    broker, _, nodes = federation
    plain = Broker(broker.process)  # the same port, spoken to in the clear
    assert refused(plain, "alice", nodes["alice"].password)
    (tmp_path / "impostor").mkdir()
    impostor = Broker(broker.process, broker_tls(tmp_path / "impostor", False))
    # a client that trusts another CA never sends its password to this broker
    assert refused(impostor, "alice", nodes["alice"].password, cert=None)


def test_with_mutual_tls_a_password_alone_or_a_foreign_certificate_is_refused(federation, tmp_path):
    broker, _, nodes = federation
    if not broker.tls.require_certificate:
        # plain TLS (the default deployment): the password is the credential
        assert not refused(broker, "alice", nodes["alice"].password, cert=None)
        return
    assert refused(broker, "alice", nodes["alice"].password, cert=None)
    rogue = pki.issue_client(pki.new_ca("rogue"), "alice")  # right name, another CA
    (tmp_path / "rogue.crt").write_bytes(rogue.cert)
    (tmp_path / "rogue.key").write_bytes(rogue.key)
    assert refused(broker, "alice", nodes["alice"].password,
                   cert=(str(tmp_path / "rogue.crt"), str(tmp_path / "rogue.key")))
    # bob's certificate with alice's password: the certificate only opens TLS, the password
    # names the node, so this is alice (and nothing of bob's is reachable through it)
    assert not refused(broker, "alice", nodes["alice"].password, cert=broker.tls.certs["bob"])
    assert refused(broker, "bob", nodes["alice"].password, cert=broker.tls.certs["bob"])
    assert not refused(broker, "alice", nodes["alice"].password)


def test_the_bundles_client_certificate_is_the_nodes_from_the_broker_ca(federation, tmp_path):
    broker, _, _ = federation
    bundle = tmp_path / "alice-bundle"
    env = (bundle / "agent.env").read_text()
    if not broker.tls.require_certificate:
        assert not (bundle / "client.crt").exists() and "FSL_MQTT_CERT_FILE" not in env
        return
    cert = x509.load_pem_x509_certificate((bundle / "client.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(broker.tls.ca.cert))
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert (bundle / "client.key").stat().st_mode & 0o077 == 0  # secret: owner only
    assert "FSL_MQTT_CERT_FILE=/etc/fsl-edge/client.crt" in env
    assert "./client.key" in (bundle / "compose.yaml").read_text()


def test_after_revoke_and_a_reload_the_node_is_out_and_the_others_stay(federation):
    broker, store, nodes = federation
    with session(broker, "coordinator", COORDINATOR_PASSWORD) as coord, \
            session(broker, "alice", nodes["alice"].password) as alice, \
            session(broker, "bob", nodes["bob"].password) as bob:
        coord.subscribe(protocol.topic_all_up(RUN))
        dropped = threading.Event()
        alice.client.on_disconnect = lambda *args: dropped.set()
        revoke(store, "alice")
        os.kill(broker.proc.pid, signal.SIGHUP)  # what the reloader sidecar does in the cluster
        # Mosquitto checks connected clients against the reloaded files: alice is cut off at once
        assert dropped.wait(TIMEOUT_S), f"alice's connection outlived the reload:\n{broker.log()}"
        bob.publish(protocol.topic_up(RUN, "bob"), b"still here")
        assert coord.next() == (protocol.topic_up(RUN, "bob"), b"still here")
    assert refused(broker, "alice", nodes["alice"].password)
    assert not refused(broker, "bob", nodes["bob"].password)
    assert not refused(broker, "coordinator", COORDINATOR_PASSWORD)
    assert broker.proc.poll() is None  # reloaded, not restarted


# --- the same against a cluster: the Secrets over the Kubernetes API (emulated), via the CLI ---


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """`fsl-edge` with enroll, revoke and nodes, through its real entry point."""
    from fsl_edge.cli.app import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLUMNS", raising=False)
    yield main


def test_enroll_and_revoke_through_the_kubernetes_api_reach_the_broker(kube, cli, tmp_path, capsys):
    from fsl_edge.auth import new_signing_key, public_key_of
    from fsl_edge.deploy import broker_auth, names
    from fsl_edge.deploy.kube import Cluster

    ns, ca = "fed", b"-----BEGIN CERTIFICATE-----\nMIIBemulated\n-----END CERTIFICATE-----\n"
    cluster = Cluster(kubeconfig=kube.kubeconfig)
    # what deploy leaves behind: the broker's certificate with its CA, the coordinator's entries
    cluster.write_secret(ns, names.BROKER_TLS_SECRET, {"ca.crt": ca, "tls.crt": b"-", "tls.key": b"-"},
                         names.LABELS, type="kubernetes.io/tls")
    passwd = broker_auth.with_password("", names.COORDINATOR, COORDINATOR_PASSWORD)
    acl = broker_auth.with_acl("", names.COORDINATOR, list(names.COORDINATOR_ACL_TOPICS))
    cluster.write_secret(ns, names.BROKER_AUTH_SECRET, {names.PASSWD_KEY: passwd.encode(),
                                                        names.ACL_KEY: acl.encode()}, names.LABELS)
    signing = new_signing_key()  # and the coordinator's message signing key
    cluster.write_secret(ns, names.COORDINATOR_SIGNING_SECRET, {
        names.SIGNING_PRIVATE_KEY: signing.encode(),
        names.SIGNING_PUBLIC_KEY: public_key_of(signing).encode()}, names.LABELS)
    where = ["--kubeconfig", str(kube.kubeconfig), "--namespace", ns]

    def broker_files() -> Path:
        """The broker's mount of fsl-broker-auth, as the kubelet would refresh it."""
        folder = tmp_path / "mount"
        folder.mkdir(exist_ok=True)
        for key, value in cluster.read_secret(ns, names.BROKER_AUTH_SECRET).items():
            (folder / key).write_bytes(value)
        return folder

    assert cli(["enroll", "alice", "--broker", "mqtt.example.org:8883", *where]) == 0
    alice_auth = cluster.read_secret(ns, names.BROKER_AUTH_SECRET)
    alice_key = cluster.read_secret(ns, names.NODE_KEYS_SECRET)["alice"]
    assert cli(["enroll", "bob", "--broker", "mqtt.example.org:8883", *where]) == 0
    auth = cluster.read_secret(ns, names.BROKER_AUTH_SECRET)
    for key in (names.PASSWD_KEY, names.ACL_KEY):  # alice's and the coordinator's lines unchanged
        assert auth[key].startswith(alice_auth[key]) and alice_auth[key].startswith(
            {names.PASSWD_KEY: passwd, names.ACL_KEY: acl}[key].encode())
    assert cluster.read_secret(ns, names.NODE_KEYS_SECRET)["alice"] == alice_key
    assert (tmp_path / "alice-bundle" / "ca.crt").read_bytes() == ca  # from the cluster
    env = {name: dict(line.split("=", 1) for line in (tmp_path / f"{name}-bundle" / "agent.env")
                      .read_text().splitlines() if line and not line.startswith("#"))
           for name in ("alice", "bob")}
    assert env["alice"]["FSL_NODE_KEY"].encode() == alice_key
    assert env["alice"]["FSL_COORDINATOR_PUBKEY"] == public_key_of(signing)

    with mosquitto_on(broker_files(), tmp_path) as broker:
        assert not refused(broker, "alice", env["alice"]["FSL_MQTT_PASSWORD"])
        assert not refused(broker, names.COORDINATOR, COORDINATOR_PASSWORD)
        assert cli(["revoke", "alice", *where]) == 0
        broker_files()
        os.kill(broker.proc.pid, signal.SIGHUP)  # what the reloader sidecar does
        deadline = time.monotonic() + TIMEOUT_S
        while not refused(broker, "alice", env["alice"]["FSL_MQTT_PASSWORD"]):
            assert time.monotonic() < deadline, f"alice still connects after the reload:\n{broker.log()}"
            time.sleep(0.1)
        assert not refused(broker, "bob", env["bob"]["FSL_MQTT_PASSWORD"])
    assert "alice" not in cluster.read_secret(ns, names.NODE_KEYS_SECRET)
    capsys.readouterr()
    assert cli(["nodes", *where]) == 0
    listed = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()
              if line.split() and line.split()[0] in ("alice", "bob")}
    assert listed["bob"] == "enrolled" and json.loads(
        cluster.read_secret(ns, "fsl-nodes")["alice"])["state"] == "revoked"
    cluster.close()

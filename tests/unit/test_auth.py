"""Message authentication: signing and checking envelopes, the replay window with boot ids, keys
and their distribution (enroll bundle, local store, deploy's Secret), configuration errors."""

import json
import logging
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from fsl_edge import auth, protocol
from fsl_edge.deploy import pki
from fsl_edge.auth import (FORGED, REPLAYED, UNKNOWN_NODE, UNSIGNED, WRONG_RUN, Authenticator, NodeKeys,
                           ReplayWindow, Signer)
from fsl_edge.errors import ConfigError, ProtocolError
from fsl_edge.protocol import Envelope, Flag, MessageKind, decode_envelope, encode_envelope, parse_topic

RUN = "run-1"
UP_A, UP_B = protocol.topic_up(RUN, "alice"), protocol.topic_up(RUN, "bob")
DOWN_A, BROADCAST = protocol.topic_down(RUN, "alice"), protocol.topic_broadcast(RUN)


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the checksum, as an attacker would, so the MAC is what catches a change."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def activation(run: str = RUN, agent: str = "alice", seq: int = 7) -> Envelope:
    env = Envelope(MessageKind.ACTIVATION_UP, run, agent, round=1, step=2, seq=seq, flags=Flag.RESEND,
                   meta={"attempt": "x-1"})
    env.add_tensor("hidden", torch.randn(2, 4, 8))
    env.add_tensor("mask", torch.ones(2, 4, dtype=torch.long))
    return env


@pytest.fixture
def keys():
    """Alice's and Bob's node keys and the coordinator's signing key, as text."""
    return {"alice": auth.new_node_key(), "bob": auth.new_node_key(), "signing": auth.new_signing_key()}


def agent(name: str, keys: dict) -> Authenticator:
    env = {auth.NODE_KEY_ENV: keys[name], auth.COORDINATOR_PUBKEY_ENV: auth.public_key_of(keys["signing"])}
    return auth.agent_authenticator(name, env)


def coordinator(keys: dict, **kw) -> Authenticator:
    trusted = {n: auth.node_key(keys[n]) for n in ("alice", "bob")}
    return Authenticator(Signer(auth.COORDINATOR, auth.signing_key(keys["signing"])), trusted, **kw)


def check(receiver: Authenticator, topic: str, data: bytes) -> str | None:
    return receiver.check(parse_topic(topic), topic, decode_envelope(data))


# --- sign and verify ----------------------------------------------------------------------------


def test_a_signed_envelope_round_trips_and_carries_sender_boot_and_mac(keys):
    alice = agent("alice", keys)
    env = activation()
    data = encode_envelope(env, alice.signer, UP_A)
    out = decode_envelope(data)
    assert out == Envelope(**{**env.__dict__, "sender": "alice", "boot": alice.signer.boot})
    assert out.flags == Flag.RESEND  # SIGNED is the wire's business, not the application's
    assert data[6] & Flag.SIGNED and out.signature.scheme is auth.Scheme.HMAC_SHA256
    assert len(out.signature.mac) == 32 and torch.equal(out.tensor("hidden"), env.tensor("hidden"))
    # an unsigned envelope is byte for byte the unsigned layout
    assert decode_envelope(encode_envelope(env)).signature is None


def test_the_coordinator_checks_agents_and_agents_check_the_coordinator(keys):
    alice, coord = agent("alice", keys), coordinator(keys)
    assert check(coord, UP_A, encode_envelope(activation(), alice.signer, UP_A)) is None
    hello = Envelope(MessageKind.HELLO, RUN, "alice", seq=3)
    for topic in (DOWN_A, BROADCAST):
        data = encode_envelope(hello, coord.signer, topic)
        assert decode_envelope(data).signature.scheme is auth.Scheme.ED25519
        assert check(alice, topic, data) is None
        hello.seq += 1


def test_a_tampered_byte_a_wrong_key_or_another_topic_is_forged(keys):
    alice, coord = agent("alice", keys), coordinator(keys)
    data = encode_envelope(activation(), alice.signer, UP_A)
    for at in (12, 60, len(data) - 4 - 32 - 1):  # header, meta, the last payload byte
        tampered = bytearray(data)
        tampered[at] ^= 0x01
        assert check(coord, UP_A, reseal(tampered)) == FORGED, at
    mac = bytearray(data)
    mac[-5] ^= 0x80
    assert check(coord, UP_A, reseal(mac)) == FORGED
    mallory = Signer("alice", auth.node_key(auth.new_node_key()))  # claims to be alice
    assert check(coord, UP_A, encode_envelope(activation(), mallory, UP_A)) == FORGED
    # alice's genuine message moved to bob's topic; bob's key, signed for alice's topic
    assert check(coord, UP_B, data) == FORGED
    bob = agent("bob", keys)
    assert check(coord, UP_A, encode_envelope(activation(agent="bob"), bob.signer, UP_A)) == FORGED


def test_an_agent_obeys_only_the_coordinators_key(keys):
    alice = agent("alice", keys)
    impostor = Signer(auth.COORDINATOR, auth.signing_key(auth.new_signing_key()))
    end = Envelope(MessageKind.ROUND_END, RUN, auth.COORDINATOR, meta={"finished": True})
    assert check(alice, BROADCAST, encode_envelope(end, impostor, BROADCAST)) == FORGED
    assert check(alice, BROADCAST, encode_envelope(end)) == UNSIGNED
    bob = Signer("bob", auth.node_key(keys["bob"]))  # a site cannot speak as the coordinator
    assert check(alice, BROADCAST, encode_envelope(end, bob, BROADCAST)) == UNKNOWN_NODE
    hmac_as_coordinator = Signer(auth.COORDINATOR, auth.node_key(auth.new_node_key()))
    assert check(alice, BROADCAST, encode_envelope(end, hmac_as_coordinator, BROADCAST)) == FORGED


def test_unsigned_unknown_and_wrong_run_messages_are_named_as_such(keys):
    coord, alice = coordinator(keys), agent("alice", keys)
    assert check(coord, UP_A, encode_envelope(activation())) == UNSIGNED
    assert check(coordinator(keys, require=False), UP_A, encode_envelope(activation())) is None
    carol = Signer("carol", auth.node_key(auth.new_node_key()))
    up_c = protocol.topic_up(RUN, "carol")
    assert check(coord, up_c, encode_envelope(activation(agent="carol"), carol, up_c)) == UNKNOWN_NODE
    # alice signs for this run's topic an envelope of another run
    assert check(coord, UP_A, encode_envelope(activation(run="run-2"), alice.signer, UP_A)) == WRONG_RUN
    # a genuine message of run-2 replayed into this run: its MAC names run-2's topic
    up_a2 = protocol.topic_up("run-2", "alice")
    assert check(coord, UP_A, encode_envelope(activation(run="run-2"), alice.signer, up_a2)) == FORGED
    # without require_auth a signed message is still checked
    assert check(coordinator(keys, require=False), UP_B,
                 encode_envelope(activation(), alice.signer, UP_A)) == FORGED


def test_a_signed_envelope_needs_its_topic_and_a_known_scheme(keys):
    alice = agent("alice", keys)
    with pytest.raises(ProtocolError, match="needs the topic"):
        encode_envelope(activation(), alice.signer)
    data = bytearray(encode_envelope(activation(), alice.signer, UP_A))
    data[32 + 8] = 9  # the scheme byte of the auth block
    with pytest.raises(ProtocolError, match="unknown authentication scheme 9"):
        decode_envelope(reseal(data))
    with pytest.raises(ProtocolError, match="truncated envelope"):
        decode_envelope(reseal(data[:32 + 4] + b"\0\0\0\0"))


# --- replay -------------------------------------------------------------------------------------


def test_a_replayed_message_is_refused_and_reordering_inside_the_window_is_not(keys):
    alice, coord = agent("alice", keys), coordinator(keys)
    sent = {seq: encode_envelope(activation(seq=seq), alice.signer, UP_A) for seq in (10, 7, 9, 3)}
    assert [check(coord, UP_A, d) for d in sent.values()] == [None] * 4
    assert [check(coord, UP_A, d) for d in sent.values()] == [REPLAYED] * 4


def test_the_window_refuses_what_is_older_than_it_and_forgets_nothing_inside():
    w = ReplayWindow(window=8)
    assert w.accept("a", 1, 100) and not w.accept("a", 1, 92) and w.accept("a", 1, 93)
    assert w.accept("a", 1, 1000)  # a jump beyond the window starts it afresh
    assert w.accept("a", 1, 999) and not w.accept("a", 1, 999) and not w.accept("a", 1, 1000)
    assert not w.accept("a", 1, 950)  # below the new window
    assert w.accept("b", 1, 5)  # senders are independent


def test_a_restarted_sender_starts_a_new_epoch_and_its_old_messages_stay_replays():
    w = ReplayWindow(window=64)
    old, new = 0xAAAA, 0xBBBB
    assert w.accept("alice", old, 1_000) and w.accept("alice", old, 1_001)
    # its new process counts from the clock: above everything the old one sent
    assert w.accept("alice", new, 5_000)
    assert not w.accept("alice", old, 1_002)  # the old boot: an unseen number is still a replay
    assert not w.accept("alice", old, 1_001)
    assert w.accept("alice", new, 5_001) and not w.accept("alice", new, 5_000)
    # a boot never seen whose numbers are below what alice sent: an old capture, not a restart
    assert not w.accept("alice", 0xCCCC, 4_000)
    assert w.accept("alice", 0xCCCC, 6_000)


def test_the_window_memory_is_bounded():
    w = ReplayWindow(window=16, max_senders=50)
    for seq in range(10_000):
        w.accept(str(seq % 100), 1, seq)
    assert len(w._senders) == 50


# --- keys: folders, revocation, configuration ---------------------------------------------------


def test_node_keys_from_a_secret_mount_and_a_revoked_node_is_unknown_after_a_reload(tmp_path, keys):
    folder = tmp_path / "node-keys"  # as Kubernetes mounts a Secret: files linked to ..data/
    data = tmp_path / "node-keys" / "..2026_01_01"
    data.mkdir(parents=True)
    for name in ("alice", "bob"):
        (data / name).write_text(keys[name])
        (folder / name).symlink_to(Path("..2026_01_01") / name)
    (folder / "..data").symlink_to("..2026_01_01")
    (folder / "junk").write_text("not a key")  # skipped with a warning, nobody else shut out
    node_keys = NodeKeys(folder, reload_s=0.0)
    assert node_keys.names() == ["alice", "bob"]
    coord = Authenticator(Signer(auth.COORDINATOR, auth.signing_key(keys["signing"])), node_keys)
    alice = agent("alice", keys)
    assert check(coord, UP_A, encode_envelope(activation(seq=1), alice.signer, UP_A)) is None
    (folder / "alice").unlink()  # revoked: the Secret lost alice's key
    assert check(coord, UP_A, encode_envelope(activation(seq=2), alice.signer, UP_A)) == UNKNOWN_NODE
    assert node_keys.names() == ["bob"]


def test_a_revoke_in_a_local_store_shuts_the_node_out(tmp_path):
    from fsl_edge.enroll import LocalStore, enroll, revoke

    store = LocalStore(tmp_path / "store")
    alice, _ = enroll(store, "alice"), enroll(store, "bob")
    node_keys = NodeKeys(store.folder, reload_s=0.0)
    assert node_keys.names() == ["alice", "bob"] and node_keys.get("alice") is not None
    revoke(store, "alice")
    assert node_keys.get("alice") is None and node_keys.get("bob") is not None
    signer = Signer("alice", auth.node_key(alice.node_key))
    coord = Authenticator(Signer(auth.COORDINATOR, auth.signing_key(auth.new_signing_key())), node_keys)
    assert check(coord, UP_A, encode_envelope(activation(), signer, UP_A)) == UNKNOWN_NODE


def test_node_keys_are_reread_on_an_unknown_sender_at_most_once_a_second(tmp_path, keys, monkeypatch):
    folder = tmp_path / "keys"
    folder.mkdir()
    clock = [auth.time.monotonic()]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])  # no real time passes
    node_keys = NodeKeys(folder)  # reload_s 5: only the unknown-sender rule applies here
    (folder / "alice").write_text(keys["alice"])
    assert node_keys.get("alice") is None  # read less than a second ago
    clock[0] += 1.5
    assert node_keys.get("alice") is not None  # enrolled meanwhile: let in without a restart


def test_a_missing_folder_holds_no_keys_yet_and_a_broken_one_is_kept_out(tmp_path, keys):
    assert NodeKeys(tmp_path / "absent").names() == []  # the Secret is optional until enroll
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / auth.NODE_KEYS_JSON).write_text("{not json")
    with pytest.raises(ConfigError, match="node-keys.json is not valid JSON"):
        NodeKeys(tmp_path / "store")
    (tmp_path / "store" / auth.NODE_KEYS_JSON).write_text(json.dumps({"alice": "c2hvcnQ="}))
    with pytest.raises(ConfigError, match="key of node alice .* is not a key: expected 32 bytes"):
        NodeKeys(tmp_path / "store")


def test_an_agent_needs_both_keys_or_neither(keys):
    assert auth.agent_authenticator("alice", {}) is None
    with pytest.raises(ConfigError, match="FSL_NODE_KEY and FSL_COORDINATOR_PUBKEY go together"):
        auth.agent_authenticator("alice", {auth.NODE_KEY_ENV: keys["alice"]})
    with pytest.raises(ConfigError, match="FSL_COORDINATOR_PUBKEY is not a key"):
        auth.agent_authenticator("alice", {auth.NODE_KEY_ENV: keys["alice"],
                                           auth.COORDINATOR_PUBKEY_ENV: "bm90IGEga2V5"})
    a = agent("alice", keys)
    assert a.require and a.signer.sender == "alice" and a.signer.boot != agent("alice", keys).signer.boot


def test_the_coordinator_is_authenticated_whenever_keys_are_configured(tmp_path, keys):
    folder = tmp_path / "keys"
    folder.mkdir()
    assert auth.coordinator_authenticator(environ={}) is None
    with pytest.raises(ConfigError, match="require_auth is set but no node keys"):
        auth.coordinator_authenticator(require=True, environ={})
    with pytest.raises(ConfigError, match="has no signing key: set FSL_COORDINATOR_SIGNING_KEY"):
        auth.coordinator_authenticator(environ={auth.NODE_KEYS_DIR_ENV: str(folder)})
    with pytest.raises(ConfigError, match="FSL_NODE_KEYS_DIR is not"):
        auth.coordinator_authenticator(environ={auth.SIGNING_KEY_ENV: keys["signing"]})
    env = {auth.NODE_KEYS_DIR_ENV: str(folder), auth.SIGNING_KEY_ENV: keys["signing"]}
    assert auth.coordinator_authenticator(environ=env).require
    assert not auth.coordinator_authenticator(require=False, environ=env).require
    (folder / auth.SIGNING_KEY_FILE).write_text(keys["signing"] + "\n")  # a local store's
    coord = auth.coordinator_authenticator(environ={auth.NODE_KEYS_DIR_ENV: str(folder)})
    assert coord.signer.scheme is auth.Scheme.ED25519 and coord.trusted.keys.names() == []


def test_the_names_the_other_modules_spell_agree():
    from fsl_edge.coordinator.coordinator import ME
    from fsl_edge.enroll.store import KEYS_JSON

    assert auth.COORDINATOR == ME and auth.NODE_KEYS_JSON == KEYS_JSON


# --- distribution: the bundle, the local store, deploy's Secret ---------------------------------


CA = b"-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_an_enrolled_site_and_a_coordinator_on_its_local_store_trust_each_other(tmp_path):
    from fsl_edge.enroll import LocalStore, Site, enroll_site

    store = LocalStore(tmp_path / "store")
    site = Site(broker="b.example:8883", ca_pem=CA, run_id=RUN)
    enroll_site(store, "alice", site, tmp_path / "alice-bundle")
    enroll_site(store, "bob", site, tmp_path / "bob-bundle")  # the signing key is made once
    bundles = [env_file(tmp_path / f"{n}-bundle" / "agent.env") for n in ("alice", "bob")]
    assert bundles[0][auth.COORDINATOR_PUBKEY_ENV] == bundles[1][auth.COORDINATOR_PUBKEY_ENV]
    assert (store.folder / auth.SIGNING_KEY_FILE).stat().st_mode & 0o077 == 0
    alice = auth.agent_authenticator("alice", bundles[0])
    coord = auth.coordinator_authenticator(environ={auth.NODE_KEYS_DIR_ENV: str(store.folder)})
    assert check(coord, UP_A, encode_envelope(activation(), alice.signer, UP_A)) is None
    start = Envelope(MessageKind.ROUND_START, RUN, "", round=1)
    assert check(alice, DOWN_A, encode_envelope(start, coord.signer, DOWN_A)) is None


def test_a_cluster_enroll_takes_the_public_key_deploy_stored(tmp_path):
    from fsl_edge.deploy import names
    from fsl_edge.enroll import KubeStore, Site, enroll_site

    class Secrets:
        def __init__(self):
            self.data = {names.BROKER_AUTH_SECRET: {"passwd": b"", "acl": b""}}

        def read_secret(self, namespace, name):
            return self.data.get(name)

        def write_secret(self, namespace, name, data, labels):
            self.data[name] = data

    cluster = Secrets()
    store = KubeStore(cluster, "fed")
    site = Site(broker="b.example:8883", ca_pem=CA)
    with pytest.raises(ConfigError, match="no coordinator signing key in namespace fed .*fsl-edge deploy"):
        enroll_site(store, "alice", site, tmp_path / "a")
    assert not (tmp_path / "a").exists() and names.NODE_KEYS_SECRET not in cluster.data
    private = auth.new_signing_key()
    cluster.data[names.COORDINATOR_SIGNING_SECRET] = {"private": private.encode(),
                                                      "public": auth.public_key_of(private).encode()}
    enroll_site(store, "alice", site, tmp_path / "a")
    assert env_file(tmp_path / "a" / "agent.env")[auth.COORDINATOR_PUBKEY_ENV] == auth.public_key_of(private)


def test_deploy_makes_the_signing_key_once_and_refuses_a_broken_one():
    from fsl_edge.deploy import names
    from fsl_edge.deploy.kube import StoredSecret
    from fsl_edge.deploy.secrets import plan_secrets

    def stored(manifest: dict) -> StoredSecret:
        import base64

        return StoredSecret({k: base64.b64decode(v) for k, v in manifest["data"].items()},
                            manifest["metadata"].get("labels", {}), "1")

    cluster: dict[str, StoredSecret] = {}
    plan = plan_secrets(cluster.get, "fed", ["fsl-broker"])
    (signing,) = [w for w in plan.writes if w["metadata"]["name"] == names.COORDINATOR_SIGNING_SECRET]
    assert any("message signing key" in n for n in plan.notes)
    cluster.update({w["metadata"]["name"]: stored(w) for w in plan.writes})
    data = cluster[names.COORDINATOR_SIGNING_SECRET].data
    assert auth.public_key_of(data["private"].decode()) == data["public"].decode()
    again = plan_secrets(cluster.get, "fed", ["fsl-broker"])
    assert names.COORDINATOR_SIGNING_SECRET not in [w["metadata"]["name"] for w in again.writes]
    cluster[names.COORDINATOR_SIGNING_SECRET] = StoredSecret(
        {"private": data["private"], "public": auth.public_key_of(auth.new_signing_key()).encode()}, {}, "2")
    with pytest.raises(ConfigError, match="fsl-coordinator-signing does not hold a matching"):
        plan_secrets(cluster.get, "fed", ["fsl-broker"])


def test_with_client_certificates_deploy_issues_the_coordinators_once_and_needs_its_own_ca():
    import base64

    from fsl_edge.deploy import names
    from fsl_edge.deploy.kube import StoredSecret
    from fsl_edge.deploy.secrets import plan_secrets

    def stored(manifest: dict, labels: dict | None = None) -> StoredSecret:
        return StoredSecret({k: base64.b64decode(v) for k, v in manifest["data"].items()},
                            manifest["metadata"].get("labels", {}) if labels is None else labels, "1")

    cluster: dict[str, StoredSecret] = {}
    plan = plan_secrets(cluster.get, "fed", ["fsl-broker"], client_certificates=True)
    cluster.update({w["metadata"]["name"]: stored(w) for w in plan.writes})
    client = cluster[names.COORDINATOR_CLIENT_TLS_SECRET].data
    assert pki.needs_reissue(client["tls.crt"], cluster[names.BROKER_CA_SECRET].data["tls.crt"], []) is None
    again = plan_secrets(cluster.get, "fed", ["fsl-broker"], client_certificates=True)
    assert names.COORDINATOR_CLIENT_TLS_SECRET not in [w["metadata"]["name"] for w in again.writes]
    # a certificate from another CA (say, the CA was restored from an older backup) is re-issued
    cluster[names.COORDINATOR_CLIENT_TLS_SECRET] = StoredSecret(
        {"tls.crt": pki.issue_client(pki.new_ca("old"), "x").cert, "tls.key": b"k"}, names.LABELS, "2")
    again = plan_secrets(cluster.get, "fed", ["fsl-broker"], client_certificates=True)
    assert any("client certificate for mutual TLS (it was not issued" in n for n in again.notes)
    # the user brought the broker's certificate: no CA here can sign a client's
    brought = {names.BROKER_TLS_SECRET: StoredSecret({"ca.crt": b"x", "tls.crt": b"x"}, {}, "1")}
    with pytest.raises(ConfigError, match="client_certificates needs the broker CA"):
        plan_secrets(brought.get, "fed", ["fsl-broker"], client_certificates=True)


def test_the_coordinator_pod_takes_its_signing_key_from_the_secret():
    from fsl_edge.deploy import names
    from fsl_edge.deploy.render import manifests_root

    sts = yaml.safe_load((manifests_root() / "base" / "coordinator-statefulset.yaml").read_text())
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[auth.SIGNING_KEY_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": names.COORDINATOR_SIGNING_SECRET, "key": names.SIGNING_PRIVATE_KEY}
    assert env[auth.NODE_KEYS_DIR_ENV]["value"] == names.NODE_KEYS_DIR


# --- logging ------------------------------------------------------------------------------------


def test_refusals_are_logged_once_per_reason_and_sender_per_interval(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    limited = auth.RateLimitedLog(logging.getLogger("t"), every_s=60)
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(5):
            limited.warning((FORGED, "alice"), "forged from %s", "alice")
        limited.warning((FORGED, "bob"), "forged from %s", "bob")
        limited.warning((REPLAYED, "alice"), "replayed from %s", "alice")
        clock[0] += 61
        limited.warning((FORGED, "alice"), "forged from %s", "alice")
    assert [r.getMessage() for r in caplog.records] == [
        "forged from alice", "forged from bob", "replayed from alice", "forged from alice (4 more like it since)"]


def test_a_worker_signs_with_the_coordinators_key_and_is_trusted_as_such(tmp_path, keys):
    from fsl_edge.protocol import Envelope, MessageKind, decode_envelope, encode_envelope, parse_topic
    folder = tmp_path / "keys"
    folder.mkdir()
    env = {auth.NODE_KEYS_DIR_ENV: str(folder), auth.SIGNING_KEY_ENV: keys["signing"]}
    worker = auth.coordinator_authenticator(auth.WORKER_PREFIX + "w0", environ=env)
    coordinator = auth.coordinator_authenticator(environ=env)
    alice = agent("alice", keys)
    down, up = "fsl/r/agent/alice/down", "fsl/r/worker/w0/up"
    for receiver in (alice, coordinator):
        msg = decode_envelope(encode_envelope(Envelope(MessageKind.HELLO, "r", "alice"), worker.signer, down))
        assert receiver.check(parse_topic(down), down, msg) is None
    # a worker's name on another worker's topic is a forgery; so is a node key posing as a worker
    msg = decode_envelope(encode_envelope(Envelope(MessageKind.HELLO, "r", "w1"), worker.signer,
                                          "fsl/r/worker/w1/up"))
    assert coordinator.check(parse_topic("fsl/r/worker/w1/up"), "fsl/r/worker/w1/up", msg) == auth.FORGED
    rogue = auth.Signer(auth.WORKER_PREFIX + "w0", auth.node_key(auth.new_node_key()))
    msg = decode_envelope(encode_envelope(Envelope(MessageKind.HELLO, "r", "w0"), rogue, up))
    assert coordinator.check(parse_topic(up), up, msg) == auth.FORGED

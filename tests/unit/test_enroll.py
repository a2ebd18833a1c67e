"""Node identities: password hashes, ACL entries, both stores (one contract), the site bundle, the CLI.

The Kubernetes store runs against an in-memory fake of the two Secret calls it depends on; the
real broker's view of the same files is tests/integration/test_enroll_broker.py.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml

from fsl_edge.auth import SIGNING_KEY_FILE, new_signing_key, public_key_of
from fsl_edge.deploy import broker_auth
from fsl_edge.deploy.broker_auth import check_password
from fsl_edge.enroll import KubeStore, LocalStore, Site, enroll, enroll_site, list_nodes, revoke
from fsl_edge.enroll import mosquitto
from fsl_edge.enroll.nodes import check_name
from fsl_edge.enroll.store import BROKER_AUTH_SECRET, BROKER_TLS_SECRET, NODES_SECRET
from fsl_edge.errors import ConfigError

CA = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
# What deploy puts in the broker's files before any node: the coordinator's own user.
COORD_PASSWD = "coordinator:$7$101$c2FsdHNhbHRzYWx0$aGFzaA==\n"
COORD_ACL = "user coordinator\ntopic readwrite fsl/#\n"


# --- Mosquitto formats --------------------------------------------------------------------------


def mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(path).is_file():
        pytest.fail("mosquitto_passwd is missing: it comes with mosquitto (scripts/setup.sh installs it)",
                    pytrace=False)
    return path


def test_the_password_hash_is_what_mosquitto_passwd_writes_for_the_same_salt(tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run([mosquitto_passwd(), "-c", "-b", str(passwd), "alice", "s3cret pw"], check=True)
    user, line = passwd.read_text().strip().split(":", 1)
    _, seven, iterations, salt, _ = line.split("$")
    assert (user, seven, int(iterations)) == ("alice", "7", broker_auth.ITERATIONS)
    assert broker_auth.hash_password("s3cret pw", salt=base64.b64decode(salt)) == line
    assert check_password(line, "s3cret pw") and not check_password(line, "s3cret")


def test_a_new_entry_is_pbkdf2_sha512_with_a_fresh_salt():
    text = mosquitto.passwd_add(mosquitto.passwd_add("", "alice", "pw"), "bob", "pw")
    users = mosquitto.passwd_users(text)
    assert list(users) == ["alice", "bob"] and users["alice"] != users["bob"]  # salted
    _, seven, _, salt, digest = users["alice"].split("$")
    assert seven == "7" and len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
    assert check_password(users["alice"], "pw")


def test_a_node_may_only_use_its_own_topics_and_the_broadcast():
    assert mosquitto.acl_block("alice") == (
        "# fsl-edge node alice\n"
        "user alice\n"
        "topic write fsl/+/agent/alice/up\n"
        "topic write fsl/+/agent/alice/step\n"  # to any split-server worker
        "topic write fsl/+/agent/alice/step/+\n"  # to the worker serving it this round
        "topic read fsl/+/agent/alice/down\n"
        "topic read fsl/+/broadcast\n"
        "topic write fsl/+/status/alice\n"
        "topic readwrite fsl/+/probe/alice\n"
        "\n")


def test_acl_edits_leave_every_other_line_as_it_was():
    text = mosquitto.acl_add(mosquitto.acl_add(COORD_ACL, "alice"), "bob", "enrolled today")
    assert text.startswith(COORD_ACL) and mosquitto.acl_users(text) == ["coordinator", "alice", "bob"]
    without_alice = mosquitto.acl_remove(text, "alice")
    assert without_alice == COORD_ACL + "\n" + mosquitto.acl_block("bob", "enrolled today")
    assert mosquitto.acl_remove(without_alice, "al") == without_alice  # a prefix is another name


def test_revoke_still_finds_a_block_after_deploy_rewrote_the_acl():
    acl = mosquitto.acl_add(mosquitto.acl_add(COORD_ACL, "alice"), "bob")
    # deploy changing the coordinator's topics renders the file again: no blank lines, and each
    # marker comment now ends the block above it
    rewritten = broker_auth.with_acl(acl, "coordinator", ["fsl/#", "audit/#"])
    assert mosquitto.acl_users(rewritten) == ["coordinator", "alice", "bob"]
    left = mosquitto.acl_remove(rewritten, "alice")
    assert mosquitto.acl_users(left) == ["coordinator", "bob"]
    assert broker_auth.acl_blocks(left)[1]["bob"] == broker_auth.acl_blocks(rewritten)[1]["bob"]
    assert "alice" not in left and left.count("# fsl-edge node bob") == 1


@pytest.mark.parametrize("name", ["", "Alice", "st_marys", "-a", "a-", "a.b", "a/b", "x" * 64, "a b"])
def test_a_node_name_must_be_a_lowercase_dns_label(name):
    with pytest.raises(ConfigError, match="DNS label"):
        check_name(name)


def test_a_63_character_name_is_fine():
    assert check_name("st-marys-" + "x" * 54) == "st-marys-" + "x" * 54


# --- one contract, both stores ------------------------------------------------------------------


class FakeCluster:
    """The two Secret calls KubeStore depends on, in memory; `fail_write` = n makes the n-th
    write from now on fail (once), as an API server that goes away for a moment."""

    def __init__(self):
        self.secrets: dict[tuple[str, str], tuple[dict[str, bytes], dict[str, str]]] = {}
        self.fail_write: int | None = None

    def read_secret(self, namespace, name):
        found = self.secrets.get((namespace, name))
        return None if found is None else dict(found[0])

    def write_secret(self, namespace, name, data, labels):
        if self.fail_write is not None:
            self.fail_write -= 1
            if self.fail_write < 0:
                self.fail_write = None
                raise ConnectionError("the API server went away")
        assert all(isinstance(v, bytes) for v in data.values())
        self.secrets[(namespace, name)] = (dict(data), dict(labels))


def local_store(tmp_path: Path) -> LocalStore:
    folder = tmp_path / "auth"
    folder.mkdir()
    (folder / "passwd").write_text(COORD_PASSWD)
    (folder / "acl").write_text(COORD_ACL)
    return LocalStore(folder)


def kube_store(tmp_path: Path) -> KubeStore:
    cluster = FakeCluster()
    cluster.write_secret("fed", BROKER_AUTH_SECRET, {"passwd": COORD_PASSWD.encode(), "acl": COORD_ACL.encode()},
                         {"app.kubernetes.io/name": "fsl-edge"})
    return KubeStore(cluster, "fed", "test-context")


@pytest.fixture(params=[local_store, kube_store], ids=["local", "kube"])
def store(request, tmp_path):
    return request.param(tmp_path)


def break_a_write(store, after: int) -> None:
    """Make the store's next write but `after` fail, once, whatever the backend."""
    if isinstance(store, KubeStore):
        store.client.fail_write = after
        return
    original, calls = store._write, []

    def failing(name, text):
        calls.append(name)
        if len(calls) == after + 1:
            raise OSError(28, "No space left on device")
        original(name, text)

    store._write = failing


def test_enroll_creates_a_user_acl_key_and_record(store):
    identity = enroll(store, "alice")
    reg = store.load()
    user_line = [line for line in reg.passwd.splitlines() if line.startswith("alice:")]
    assert len(user_line) == 1 and check_password(user_line[0].split(":", 1)[1], identity.password)
    assert "alice" in mosquitto.acl_users(reg.acl)
    assert reg.keys == {"alice": identity.node_key} and len(base64.b64decode(identity.node_key)) == 32
    assert reg.nodes["alice"].state == "enrolled" and reg.nodes["alice"].enrolled_at == identity.enrolled_at
    assert identity.password not in reg.passwd + reg.acl + json.dumps(reg.keys)  # only its hash is kept


def test_enrolling_a_second_node_leaves_the_first_and_the_coordinator_byte_identical(store):
    enroll(store, "alice")
    before = store.load()
    enroll(store, "bob")
    after = store.load()
    assert after.passwd.startswith(before.passwd) and after.passwd.startswith(COORD_PASSWD)
    assert after.acl.startswith(before.acl) and after.acl.startswith(COORD_ACL)
    assert after.keys["alice"] == before.keys["alice"] and after.nodes["alice"] == before.nodes["alice"]
    assert sorted(after.nodes) == ["alice", "bob"] and after.keys["bob"] != after.keys["alice"]


def test_enrolling_a_name_twice_is_an_error_that_changes_nothing(store):
    enroll(store, "alice")
    before = store.load()
    with pytest.raises(ConfigError, match="'alice' is already enrolled"):
        enroll(store, "alice")
    assert store.load() == before


def test_a_name_the_broker_already_has_is_refused(store):
    with pytest.raises(ConfigError, match="not enrolled by fsl-edge"):
        enroll(store, "coordinator")


def test_revoke_removes_the_credentials_and_keeps_the_record(store):
    enroll(store, "alice")
    enroll(store, "bob")
    bob_before = store.load()
    revoke(store, "alice")
    reg = store.load()
    assert "alice" not in mosquitto.passwd_users(reg.passwd) and "alice" not in mosquitto.acl_users(reg.acl)
    assert "alice" not in reg.keys and reg.nodes["alice"].state == "revoked" and reg.nodes["alice"].revoked_at
    # everyone else untouched
    bob_line = next(line for line in bob_before.passwd.splitlines(keepends=True) if line.startswith("bob:"))
    assert reg.passwd == COORD_PASSWD + bob_line
    assert reg.acl == COORD_ACL + "\n" + mosquitto.acl_block("bob", _note(bob_before.acl, "bob"))
    assert reg.keys == {"bob": bob_before.keys["bob"]} and reg.nodes["bob"] == bob_before.nodes["bob"]


def _note(acl: str, name: str) -> str:
    line = next(line for line in acl.splitlines() if line.startswith(f"# fsl-edge node {name} ("))
    return line.split(" (", 1)[1].rstrip(")")


def test_revoking_an_unknown_or_revoked_name_is_an_error(store):
    with pytest.raises(ConfigError, match="no node named 'ghost' is enrolled"):
        revoke(store, "ghost")
    enroll(store, "alice")
    revoke(store, "alice")
    with pytest.raises(ConfigError, match="already revoked"):
        revoke(store, "alice")
    with pytest.raises(ConfigError, match="revoked name is not reused"):
        enroll(store, "alice")


def test_nodes_lists_states_and_marks_connected_ones_online(store):
    assert list_nodes(store) == []
    for name in ("carol", "alice", "bob"):
        enroll(store, name)
    revoke(store, "bob")
    listed = list_nodes(store, {"alice": "training", "bob": "online", "carol": "offline"})
    assert [(n.name, n.state) for n in listed] == [("alice", "online"), ("bob", "revoked"), ("carol", "enrolled")]
    assert [n.state for n in list_nodes(store)] == ["enrolled", "revoked", "enrolled"]


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_write_that_fails_midway_leaves_the_store_as_it_was(store, after):
    enroll(store, "alice")
    before = store.load()
    break_a_write(store, after)
    with pytest.raises((OSError, ConnectionError)):
        enroll(store, "bob")
    assert store.load() == before


# --- backend specifics ----------------------------------------------------------------------


def test_the_local_store_files_are_owner_only(tmp_path):
    store = LocalStore(tmp_path / "new" / "auth")  # created on first enroll
    enroll(store, "alice")
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in store.folder.iterdir()}
    assert files == {"passwd": 0o600, "acl": 0o600, "nodes.json": 0o600, "node-keys.json": 0o600}
    assert json.loads((store.folder / "nodes.json").read_text())["alice"]["state"] == "enrolled"


def test_the_kube_store_secrets_names_keys_and_labels(tmp_path):
    store = kube_store(tmp_path)
    identity = enroll(store, "alice")
    secrets = store.client.secrets
    auth, _ = secrets[("fed", "fsl-broker-auth")]  # what the broker mounts
    keys, key_labels = secrets[("fed", "fsl-node-keys")]  # what the coordinator mounts
    nodes, _ = secrets[("fed", "fsl-nodes")]
    assert set(auth) == {"passwd", "acl"} and auth["passwd"].startswith(COORD_PASSWD.encode())
    assert keys == {"alice": identity.node_key.encode()}
    assert json.loads(nodes["alice"])["state"] == "enrolled"
    assert key_labels["app.kubernetes.io/managed-by"] == "fsl-edge"
    assert key_labels["app.kubernetes.io/component"] == "node-keys"


def test_the_kube_store_needs_the_deployed_broker_secret():
    with pytest.raises(ConfigError, match="no Secret fsl-broker-auth in namespace fed .*fsl-edge deploy"):
        enroll(KubeStore(FakeCluster(), "fed", "ctx"), "alice")


def test_a_corrupt_node_list_is_a_clear_error(tmp_path):
    store = local_store(tmp_path)
    (store.folder / "nodes.json").write_text("{not json")
    with pytest.raises(ConfigError, match="nodes.json is not valid JSON"):
        list_nodes(store)


# --- the site bundle ----------------------------------------------------------------------------


SITE = Site(broker="broker.example.org:8883", ca_pem=CA, run_id="trial-1", image="registry.example/fsl-agent:1")


def compose_schema() -> dict:
    # The Compose Specification's schema as check-jsonschema vendors it (Apache-2.0, compose-spec)
    path = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(path.read_text())


def env_of(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_the_bundle_holds_what_the_site_needs_with_secrets_owner_only(tmp_path):
    store = local_store(tmp_path)
    out = tmp_path / "alice-bundle"
    identity = enroll_site(store, "alice", SITE, out)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"compose.yaml": 0o644, "agent.env": 0o600, "ca.crt": 0o644, "README.md": 0o644,
                     "data": modes["data"], "models": modes["models"]}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "ca.crt").read_bytes() == CA
    assert "docker compose up -d" in (out / "README.md").read_text()
    env = env_of(out / "agent.env")
    coordinator_key = public_key_of((store.folder / SIGNING_KEY_FILE).read_text())
    assert env == {"FSL_AGENT_ID": "alice", "FSL_BROKER": "mqtts://broker.example.org:8883",
                   "FSL_MQTT_USERNAME": "alice", "FSL_MQTT_PASSWORD": identity.password,
                   "FSL_MQTT_CA_FILE": "/etc/fsl-edge/ca.crt", "FSL_NODE_KEY": identity.node_key,
                   "FSL_COORDINATOR_PUBKEY": coordinator_key, "FSL_MODELS_DIR": "/models"}
    hashed = next(line for line in store.load().passwd.splitlines() if line.startswith("alice:"))
    assert check_password(hashed.split(":", 1)[1], env["FSL_MQTT_PASSWORD"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_the_compose_file_follows_the_compose_specification(tmp_path):
    out = tmp_path / "b"
    enroll_site(local_store(tmp_path), "alice", SITE, out)
    doc = yaml.safe_load((out / "compose.yaml").read_text())
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(doc)] == []
    agent = doc["services"]["agent"]
    assert agent["image"] == "registry.example/fsl-agent:1" and agent["restart"] == "unless-stopped"
    assert agent["env_file"] == "agent.env"
    assert agent["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert {v["target"] for v in agent["volumes"]} == {"/data", "/models", "/state", "/etc/fsl-edge/ca.crt"}
    # the schema does catch mistakes: the same document with a misspelt key fails
    agent["restrat"] = "always"
    assert list(validator.iter_errors(doc))


def test_the_compose_command_uses_flags_the_agent_has(tmp_path):
    from typer.main import get_command

    from fsl_edge.cli.agent import agent

    app = typer.Typer()
    app.command()(agent)
    options = {opt for p in get_command(app).params for opt in p.opts}
    out = tmp_path / "b"
    enroll_site(local_store(tmp_path), "alice", SITE, out)
    command = yaml.safe_load((out / "compose.yaml").read_text())["services"]["agent"]["command"]
    assert {arg for arg in command if arg.startswith("--")} <= options
    # the variables the agent reads today (the others await TLS and credentials in the transport)
    envvars = {p.envvar for p in get_command(app).params if p.envvar}
    assert {"FSL_AGENT_ID", "FSL_BROKER"} <= envvars


def test_a_failed_enroll_leaves_neither_a_bundle_nor_an_identity(tmp_path):
    store = local_store(tmp_path)
    before = store.load()
    break_a_write(store, 2)
    out = tmp_path / "alice-bundle"
    with pytest.raises(OSError):
        enroll_site(store, "alice", SITE, out)
    assert not out.exists() and store.load() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth"]


@pytest.mark.parametrize("broker", ["broker.example.org", "broker:0", "broker:99999", "mqtt://b:1883", "b:x"])
def test_a_bad_broker_address_is_refused(broker):
    with pytest.raises(ConfigError, match="--broker"):
        Site(broker=broker, ca_pem=CA)


def test_an_ipv6_broker_and_a_non_pem_ca():
    assert Site(broker="[fd00::1]:8883", ca_pem=CA).broker_url == "mqtts://[fd00::1]:8883"
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        Site(broker="b:8883", ca_pem=b"hello")


def test_an_existing_bundle_folder_is_never_overwritten(tmp_path):
    store = local_store(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty folder"):
        enroll_site(store, "alice", SITE, out)
    assert store.load().nodes == {} and [p.name for p in out.iterdir()] == ["keep.txt"]


# --- the CLI --------------------------------------------------------------------------------


def test_the_commands_load_without_torch():
    # cli/app.py imports every command module on each `fsl-edge` run, --help included.
    code = "import sys, fsl_edge.cli.enroll; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """`fsl-edge` with enroll, revoke and nodes, through its real entry point and error mapping."""
    from fsl_edge.cli.app import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLUMNS", raising=False)
    (tmp_path / "ca.crt").write_bytes(CA)
    yield main


def test_cli_enroll_revoke_nodes_on_a_local_folder(cli, tmp_path, capsys):
    assert cli(["enroll", "alice", "--broker", "b.example:8883", "--ca", "ca.crt", "--local", "auth"]) == 0
    out = capsys.readouterr().out
    assert "enrolled alice" in out and "alice-bundle" in out and "docker compose up -d" in out
    assert (tmp_path / "alice-bundle" / "agent.env").is_file()
    assert cli(["revoke", "alice", "--local", "auth"]) == 0
    assert "revoked alice" in capsys.readouterr().out
    assert cli(["nodes", "--local", "auth"]) == 0
    assert "revoked" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["revoke", "ghost", "--local", "auth"], "no node named 'ghost' is enrolled"),
    (["enroll", "Bad_Name", "--broker", "b:8883", "--ca", "ca.crt", "--local", "auth"], "DNS label"),
    (["enroll", "alice", "--broker", "b:8883", "--local", "auth"], "--ca is required"),
    (["enroll", "alice", "--broker", "b:8883", "--ca", "nope.crt", "--local", "auth"], "cannot read the broker CA"),
    (["nodes", "--local", "auth", "--context", "prod"], "exclude each other"),
])
def test_cli_bad_input_is_one_line_and_exit_2_with_nothing_written(cli, tmp_path, capsys, args, message):
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "auth").exists() and not (tmp_path / "alice-bundle").exists()


def test_cli_enroll_with_a_client_certificate_from_the_local_ca(cli, tmp_path, capsys):
    from cryptography import x509

    from fsl_edge.deploy import pki

    ca = pki.new_ca("local")
    (tmp_path / "own-ca.crt").write_bytes(ca.cert)
    (tmp_path / "own-ca.key").write_bytes(ca.key)
    (tmp_path / "other.key").write_bytes(pki.new_ca("other").key)
    where = ["--broker", "b:8883", "--local", "auth"]
    # refusals first: nothing may be written by any of them
    for args, message in (
            (["--ca", "ca.crt", "--client-cert"], "needs --ca and --ca-key"),
            (["--ca", "own-ca.crt", "--ca-key", "other.key"], "the key is not the certificate's"),
            (["--ca", "ca.crt", "--ca-key", "own-ca.key"], "not a PEM certificate"),
            (["--ca", "own-ca.crt", "--ca-key", "missing.key"], "cannot read the CA key")):
        assert cli(["enroll", "alice", *where, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "auth").exists() and not (tmp_path / "alice-bundle").exists()
    assert cli(["enroll", "alice", *where, "--ca", "own-ca.crt", "--ca-key", "own-ca.key"]) == 0
    assert "client.crt, client.key (secret)" in capsys.readouterr().out
    bundle = tmp_path / "alice-bundle"
    cert = x509.load_pem_x509_certificate((bundle / "client.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert))
    assert (bundle / "client.key").stat().st_mode & 0o777 == 0o600
    assert "FSL_MQTT_KEY_FILE=/etc/fsl-edge/client.key" in (bundle / "agent.env").read_text()
    assert "chown 10001 client.key" in (bundle / "README.md").read_text()


def test_cli_against_a_cluster_takes_the_ca_from_its_secret(cli, tmp_path, capsys, monkeypatch):
    import types

    cluster = kube_store(tmp_path).client
    cluster.write_secret("fed", BROKER_TLS_SECRET, {"ca.crt": CA, "tls.crt": b"...", "tls.key": b"..."}, {})
    signing = new_signing_key()  # deploy made it: the bundle names its public half
    cluster.write_secret("fed", "fsl-coordinator-signing",
                         {"private": signing.encode(), "public": public_key_of(signing).encode()}, {})
    contexts = []

    def connect(context, kubeconfig):  # deploy.kube.Cluster, on this fake API
        contexts.append(context)
        cluster.context = context
        return cluster

    fake = types.ModuleType("fsl_edge.deploy.kube")
    fake.Cluster = connect
    monkeypatch.setitem(sys.modules, "fsl_edge.deploy.kube", fake)
    assert cli(["enroll", "alice", "--broker", "b:8883", "--context", "prod", "--namespace", "fed"]) == 0
    assert "namespace fed of context prod" in capsys.readouterr().out and contexts == ["prod"]
    assert (tmp_path / "alice-bundle" / "ca.crt").read_bytes() == CA
    assert cli(["revoke", "alice", "--context", "prod", "--namespace", "fed"]) == 0
    assert json.loads(cluster.secrets[("fed", NODES_SECRET)][0]["alice"])["state"] == "revoked"
    assert cli(["enroll", "bob", "--broker", "b:8883", "--context", "prod", "--namespace", "other"]) == 2
    assert "no broker CA in namespace other of context prod (Secret fsl-broker-tls" in capsys.readouterr().err
    # a deployment with client_certificates (deploy issued the coordinator's): sites get one too
    from fsl_edge.deploy import pki

    ca = pki.new_ca("mt")
    cluster.write_secret("mt", BROKER_TLS_SECRET, {"ca.crt": ca.cert}, {})
    cluster.write_secret("mt", BROKER_AUTH_SECRET, {"passwd": COORD_PASSWD.encode(),
                                                    "acl": COORD_ACL.encode()}, {})
    cluster.write_secret("mt", "fsl-coordinator-signing",
                         {"private": signing.encode(), "public": public_key_of(signing).encode()}, {})
    cluster.write_secret("mt", "fsl-coordinator-client-tls", {"tls.crt": b"...", "tls.key": b"..."}, {})
    mt = ["--broker", "b:8883", "--context", "prod", "--namespace", "mt"]
    assert cli(["enroll", "carol", *mt]) == 2  # the CA's key is not there to sign with
    assert "needs the broker CA's key (Secret fsl-broker-ca" in capsys.readouterr().err
    cluster.write_secret("mt", "fsl-broker-ca", {"tls.crt": ca.cert, "tls.key": ca.key}, {})
    assert cli(["enroll", "carol", *mt]) == 0
    assert (tmp_path / "carol-bundle" / "client.crt").is_file()
    assert cli(["enroll", "dave", *mt, "--no-client-cert"]) == 0
    assert not (tmp_path / "dave-bundle" / "client.crt").exists()


def test_cli_enrolling_twice_keeps_the_first_bundle(cli, tmp_path, capsys):
    args = ["enroll", "alice", "--broker", "b:8883", "--ca", "ca.crt", "--local", "auth"]
    assert cli(args) == 0
    env = (tmp_path / "alice-bundle" / "agent.env").read_bytes()
    capsys.readouterr()
    assert cli(args + ["--out", "second"]) == 2
    assert "already enrolled" in capsys.readouterr().err
    assert (tmp_path / "alice-bundle" / "agent.env").read_bytes() == env and not (tmp_path / "second").exists()


@pytest.fixture
def status_api():
    """A status API on a free loopback port answering with one run where alice trains."""
    import http.server
    import threading

    from fsl_edge.status import AgentStatus, Status

    body = Status(run="demo", agents={"alice": AgentStatus(state="training"),
                                      "bob": AgentStatus(state="offline")}).model_dump_json().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cli_nodes_shows_which_nodes_the_coordinator_sees_online(cli, capsys, status_api):
    for name in ("alice", "bob"):
        assert cli(["enroll", name, "--broker", "b:8883", "--ca", "ca.crt", "--local", "auth"]) == 0
    capsys.readouterr()
    assert cli(["nodes", "--local", "auth", "--url", status_api]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("alice", "bob")}
    assert "online" in rows["alice"] and "enrolled" in rows["bob"]


def test_cli_nodes_without_a_reachable_coordinator_warns_and_still_lists(cli, capsys):
    from fsl_edge.broker import free_port

    assert cli(["enroll", "alice", "--broker", "b:8883", "--ca", "ca.crt", "--local", "auth"]) == 0
    capsys.readouterr()
    assert cli(["nodes", "--local", "auth", "--url", f"http://127.0.0.1:{free_port()}"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "alice" in captured.out and "enrolled" in captured.out

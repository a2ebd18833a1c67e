"""`fsl-edge deploy` end to end against a Kubernetes API emulator over real HTTP (kube_emulator):
the real `kubernetes` client, a real kubeconfig, the real manifests; and the deployed broker
configuration and credentials loaded into a real Mosquitto."""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from kubernetes_validate import utils as kv

from fsl_edge.broker import find_mosquitto, free_port
from fsl_edge.deploy import broker_auth, names, pki
from fsl_edge.deploy.kube import Cluster
from fsl_edge.errors import TemporaryError

from .kube_emulator import isolate_from_machine

NS = "fed"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate_from_machine(tmp_path, monkeypatch)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)


def fsl_edge_deploy(*args: str) -> int:
    """`fsl-edge deploy ARGS` through the CLI's entry point (errors -> one line + exit code)."""
    from fsl_edge.cli.app import main

    return main(["deploy", *args])


def deploy_to(kube, *args: str) -> int:
    return fsl_edge_deploy("--kubeconfig", str(kube.kubeconfig), "--namespace", NS, "--gpus", "0", *args)


def secret(kube, name: str) -> dict[str, bytes]:
    data = kube.objects()[("secrets", NS, name)]["data"]
    return {k: base64.b64decode(v) for k, v in data.items()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_deploy_creates_every_object_and_the_secrets(kube, capsys):
    assert deploy_to(kube) == 0
    err = capsys.readouterr().err
    objects = kube.objects()
    kinds = sorted((plural, name.rsplit("-", 1)[0] if plural == "configmaps" else name)
                   for plural, _, name in objects)
    assert kinds == sorted([
        ("namespaces", NS), ("configmaps", "fsl-broker-config"), ("configmaps", "fsl-coordinator-config"),
        ("services", "fsl-broker"), ("services", "fsl-coordinator"), ("deployments", "fsl-broker"),
        ("statefulsets", "fsl-coordinator"), ("poddisruptionbudgets", "fsl-coordinator"),
        ("networkpolicies", "fsl-default-deny-ingress"), ("networkpolicies", "fsl-broker-ingress"),
        ("networkpolicies", "fsl-coordinator-ingress"), ("secrets", names.BROKER_CA_SECRET),
        ("secrets", names.BROKER_TLS_SECRET), ("secrets", names.BROKER_AUTH_SECRET),
        ("secrets", names.COORDINATOR_MQTT_SECRET), ("secrets", names.COORDINATOR_SIGNING_SECRET)])
    assert all(ns == NS for (plural, ns, _) in objects if plural != "namespaces")
    for (plural, _, _), obj in objects.items():
        if plural == "secrets":  # what deploy made itself (the rest is checked in unit tests)
            kv.validate({k: v for k, v in obj.items() if k in ("apiVersion", "kind", "data", "type")}
                        | {"metadata": {"name": obj["metadata"]["name"]}}, "1.29", strict=True)

    # the server certificate: from the CA, for the in-cluster names and the load balancer's address
    ca, tls = secret(kube, names.BROKER_CA_SECRET), secret(kube, names.BROKER_TLS_SECRET)
    assert tls["ca.crt"] == ca["tls.crt"]
    x509.load_pem_x509_certificate(tls["tls.crt"]).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca["tls.crt"]))
    assert set(pki.cert_names(tls["tls.crt"])) == {
        "fsl-broker", f"fsl-broker.{NS}", f"fsl-broker.{NS}.svc", f"fsl-broker.{NS}.svc.cluster.local",
        kube.api.lb_address}

    # the coordinator's identity, in the broker's password file and ACL
    coordinator = secret(kube, names.COORDINATOR_MQTT_SECRET)
    assert coordinator["username"] == b"fsl-coordinator" and len(coordinator["password"]) >= 32
    auth = secret(kube, names.BROKER_AUTH_SECRET)
    hashed = broker_auth.passwd_users(auth["passwd"].decode())["fsl-coordinator"]
    assert broker_auth.check_password(hashed, coordinator["password"].decode())
    assert broker_auth.acl_blocks(auth["acl"].decode())[1] == {"fsl-coordinator": ["topic readwrite fsl/#"]}

    assert f"mqtts://{kube.api.lb_address}:8883" in err and "fsl-edge enroll NAME" in err


def test_redeploy_changes_nothing(kube):
    assert deploy_to(kube) == 0
    before = kube.objects()
    assert deploy_to(kube) == 0
    assert kube.objects() == before  # same content, same resourceVersions


def test_a_new_host_reissues_the_certificate_from_the_same_ca(kube, monkeypatch):
    assert deploy_to(kube) == 0
    ca, tls = secret(kube, names.BROKER_CA_SECRET), secret(kube, names.BROKER_TLS_SECRET)
    ca_version = kube.objects()[("secrets", NS, names.BROKER_CA_SECRET)]["metadata"]["resourceVersion"]
    monkeypatch.setenv("FSL_EXPOSE__HOST", "mqtt.hospitals.example.org")
    assert deploy_to(kube) == 0
    new_tls = secret(kube, names.BROKER_TLS_SECRET)
    assert secret(kube, names.BROKER_CA_SECRET) == ca
    assert kube.objects()[("secrets", NS, names.BROKER_CA_SECRET)]["metadata"]["resourceVersion"] == ca_version
    assert new_tls["ca.crt"] == tls["ca.crt"] and new_tls["tls.crt"] != tls["tls.crt"]
    assert "mqtt.hospitals.example.org" in pki.cert_names(new_tls["tls.crt"])


def test_sites_enrolled_meanwhile_are_kept(kube):
    assert deploy_to(kube) == 0
    with Cluster(kubeconfig=kube.kubeconfig) as cluster:  # what `fsl-edge enroll` does
        stored = cluster.get_secret(NS, names.BROKER_AUTH_SECRET)
        passwd = stored.data["passwd"].decode() + f"site-a:{broker_auth.hash_password('a-secret')}\n"
        # a marker comment and blank lines between blocks, as enroll writes them
        acl = (stored.data["acl"].decode() + "\n# fsl-edge node site-a\nuser site-a\n"
               "topic write fsl/+/agent/site-a/up\ntopic read fsl/+/broadcast\n\n")
        cluster.write_secret(NS, names.BROKER_AUTH_SECRET, {"passwd": passwd.encode(), "acl": acl.encode()},
                             names.LABELS, resource_version=stored.resource_version)
    enrolled = kube.objects()[("secrets", NS, names.BROKER_AUTH_SECRET)]
    assert deploy_to(kube) == 0
    assert kube.objects()[("secrets", NS, names.BROKER_AUTH_SECRET)] == enrolled


def test_secrets_can_be_read_and_written_and_a_stale_write_is_refused(kube):
    with Cluster(kubeconfig=kube.kubeconfig) as cluster:
        assert cluster.read_secret(NS, names.NODE_KEYS_SECRET) is None
        version = cluster.write_secret(NS, names.NODE_KEYS_SECRET, {"site-a": b"\x00key"}, names.LABELS)
        assert cluster.read_secret(NS, names.NODE_KEYS_SECRET) == {"site-a": b"\x00key"}
        cluster.write_secret(NS, names.NODE_KEYS_SECRET, {"site-a": b"\x00key", "site-b": b"k2"},
                             names.LABELS, resource_version=version)
        with pytest.raises(TemporaryError, match="changed by someone else"):
            cluster.write_secret(NS, names.NODE_KEYS_SECRET, {"site-c": b"k3"}, names.LABELS,
                                 resource_version=version)
        assert set(cluster.read_secret(NS, names.NODE_KEYS_SECRET)) == {"site-a", "site-b"}


def test_dry_run_prints_the_manifests_without_a_cluster(capsys):
    assert fsl_edge_deploy("--dry-run", "--namespace", NS) == 0
    objects = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    assert objects[0]["kind"] == "Namespace" and objects[0]["metadata"]["name"] == NS
    assert {"StatefulSet", "Deployment", "NetworkPolicy", "PodDisruptionBudget"} <= {o["kind"] for o in objects}
    assert "Secret" not in {o["kind"] for o in objects}  # keys never go to stdout or git


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_output_writes_a_folder_kubectl_can_apply(tmp_path, capsys):
    assert fsl_edge_deploy("--output", str(tmp_path / "gitops"), "--gpus", "2") == 0
    capsys.readouterr()
    assert fsl_edge_deploy("--dry-run", "--gpus", "2") == 0
    printed = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    built = subprocess.run(["kubectl", "kustomize", str(tmp_path / "gitops")], capture_output=True,
                           text=True, check=True).stdout
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted([o for o in yaml.safe_load_all(built) if o], key=key) == sorted(printed, key=key)


def test_bad_config_is_one_line_and_touches_nothing(kube, tmp_path, capsys):
    config = tmp_path / "deploy.yaml"
    config.write_text("namespce: fed\ngpus: many\nexpose:\n  mode: ingress\n")
    assert fsl_edge_deploy("--kubeconfig", str(kube.kubeconfig), "--config", str(config)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "namespce" in line and "gpus" in line and "expose.mode" in line and str(config) in line
    assert kube.request_count() == 0


def test_an_unreachable_cluster_is_one_line(tmp_path, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}]}))
    assert fsl_edge_deploy("--kubeconfig", str(kubeconfig)) == TemporaryError.exit_code
    assert "cannot reach the Kubernetes API at http://127.0.0.1:" in one_error_line(capsys.readouterr().err)


def test_a_missing_context_or_kubeconfig_is_one_line(kube, tmp_path, capsys):
    assert deploy_to(kube, "--context", "production") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'production' is not in" in line and "emulated" in line
    assert fsl_edge_deploy("--kubeconfig", str(tmp_path / "nowhere")) == 2
    assert "no kubeconfig at" in one_error_line(capsys.readouterr().err)
    assert fsl_edge_deploy() == 2  # neither KUBECONFIG nor ~/.kube/config
    assert "no kubeconfig at ~/.kube/config" in one_error_line(capsys.readouterr().err)
    assert kube.request_count() == 0


def test_a_storage_change_is_refused_before_any_write(kube, tmp_path, capsys):
    assert deploy_to(kube) == 0
    capsys.readouterr()
    before, patches = kube.objects(), kube.request_count("PATCH")
    config = tmp_path / "deploy.yaml"
    config.write_text("storage:\n  size: 50Gi\n")
    assert deploy_to(kube, "--config", str(config)) == 2
    assert "storage cannot change" in one_error_line(capsys.readouterr().err)
    assert kube.request_count("PATCH") == patches and kube.objects() == before


def test_a_rollout_that_never_finishes_times_out(kube, monkeypatch, capsys):
    kube.api.controllers = False
    monkeypatch.setenv("FSL_ROLLOUT_TIMEOUT_S", "0.5")
    assert deploy_to(kube) == TemporaryError.exit_code
    err = capsys.readouterr().err
    assert "not ready after" in err and "statefulset/fsl-coordinator (0/1 ready)" in err


def test_a_node_port_and_host_make_the_endpoint(kube, tmp_path, capsys):
    config = tmp_path / "deploy.yaml"
    config.write_text("expose:\n  mode: nodeport\n  node_port: 30883\n  host: mqtt.example.org\n")
    assert deploy_to(kube, "--config", str(config)) == 0
    assert "mqtts://mqtt.example.org:30883" in capsys.readouterr().err
    service = kube.objects()[("services", NS, names.BROKER)]
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["nodePort"] == 30883


def deployed_broker(kube, tmp_path, extra_config: str = "") -> tuple[Path, list[str], str]:
    """Deploy, then lay out what the broker pod sees under tmp_path/mosquitto: the rendered
    mosquitto.conf (on a free loopback port) and the Secrets' files. Returns (root, the broker's
    argv, the reloader's script), every /mosquitto/ path moved under root."""
    config = tmp_path / "deploy.yaml"
    config.write_text("expose:\n  mode: none\n  host: 127.0.0.1\n" + extra_config)
    assert deploy_to(kube, "--config", str(config)) == 0
    root, port = tmp_path / "mosquitto", free_port()
    for name, folder in ((names.BROKER_TLS_SECRET, "tls"), (names.BROKER_AUTH_SECRET, "auth")):
        (root / folder).mkdir(parents=True)
        for key, value in secret(kube, name).items():
            (root / folder / key).write_bytes(value)
    objects = kube.objects()
    conf_map = next(o for (plural, _, name), o in objects.items()
                    if plural == "configmaps" and name.startswith("fsl-broker-config"))
    conf = conf_map["data"]["mosquitto.conf"].replace("/mosquitto/", f"{root}/")
    conf = conf.replace(f"listener {names.BROKER_PORT}", f"listener {port} 127.0.0.1")
    # started as root (CI), mosquitto would switch to its own user, who cannot read tmp_path
    conf += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
    (root / "config").mkdir()
    (root / "config" / "mosquitto.conf").write_text(conf)
    pod = objects[("deployments", NS, names.BROKER)]["spec"]["template"]["spec"]
    mosquitto, reloader = pod["containers"]
    argv = [find_broker() if mosquitto["command"][0] == "mosquitto" else mosquitto["command"][0],
            *mosquitto["command"][1:]]
    argv = [a.replace("/mosquitto/", f"{root}/") for a in argv]
    return root, argv, reloader["command"][-1].replace("/mosquitto/", f"{root}/"), port


def find_broker() -> str:
    try:
        return find_mosquitto()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.integration
def test_the_deployed_broker_config_admits_the_coordinator_over_tls(kube, tmp_path):
    """The rendered mosquitto.conf with the Secrets deploy wrote, in a real Mosquitto."""
    import paho.mqtt.client as mqtt

    root, argv, _, port = deployed_broker(kube, tmp_path)
    log = tmp_path / "mosquitto.log"
    broker = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        password = secret(kube, names.COORDINATOR_MQTT_SECRET)["password"].decode()
        assert _round_trip(mqtt, port, root / "tls" / "ca.crt", "fsl-coordinator", password), log.read_text()
        assert not _round_trip(mqtt, port, root / "tls" / "ca.crt", "fsl-coordinator", "wrong")
    finally:
        broker.terminate()
        broker.wait(5)


@pytest.mark.integration
def test_the_coordinators_own_link_logs_in_over_tls_with_its_environment(kube, tmp_path):
    """fsl_edge.transport as the coordinator's pod runs it: mqtts:// and FSL_MQTT_* from env."""
    from fsl_edge.errors import TransportError
    from fsl_edge.transport import BrokerLogin, MqttLink

    root, argv, _, port = deployed_broker(kube, tmp_path)
    log = tmp_path / "mosquitto.log"
    broker = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    password = secret(kube, names.COORDINATOR_MQTT_SECRET)["password"].decode()
    env = {"FSL_MQTT_USERNAME": "fsl-coordinator", "FSL_MQTT_CA_FILE": str(root / "tls" / "ca.crt")}
    try:
        link = MqttLink(f"mqtts://127.0.0.1:{port}", "t-coordinator", ["fsl/+/agent/+/up"],
                        login=BrokerLogin.from_env({**env, "FSL_MQTT_PASSWORD": password}))
        link.start(timeout=10)
        link.stop()
        wrong = MqttLink(f"mqtts://127.0.0.1:{port}", "t-wrong", [],
                         login=BrokerLogin.from_env({**env, "FSL_MQTT_PASSWORD": "wrong"}))
        with pytest.raises(TransportError, match="refused us"):
            wrong.start(timeout=3)
        plain = MqttLink(f"mqtt://127.0.0.1:{port}", "t-plain", [],  # no TLS: no connection
                         login=BrokerLogin.from_env({**env, "FSL_MQTT_PASSWORD": password}))
        with pytest.raises(TransportError):
            plain.start(timeout=3)
    finally:
        broker.terminate()
        broker.wait(5)


@pytest.mark.integration
def test_with_client_certificates_the_coordinator_gets_in_with_its_certificate_only(kube, tmp_path):
    """Mutual TLS as deployed: the rendered broker config demands a client certificate, and the
    coordinator's pod environment (its Secret's files) supplies the one deploy issued."""
    from fsl_edge.errors import TransportError
    from fsl_edge.transport import BrokerLogin, MqttLink

    root, argv, _, port = deployed_broker(kube, tmp_path, "client_certificates: true\n")
    assert "\nrequire_certificate true" in (root / "config" / "mosquitto.conf").read_text()
    client = secret(kube, names.COORDINATOR_CLIENT_TLS_SECRET)
    for key, value in client.items():  # where the pod mounts it
        (root / key).write_bytes(value)
    sts = kube.objects()[("statefulsets", NS, names.COORDINATOR)]["spec"]["template"]["spec"]
    pod_env = {e["name"]: e.get("value") for e in sts["containers"][0]["env"]}
    assert pod_env["FSL_MQTT_CERT_FILE"] == f"{names.CLIENT_TLS_DIR}/tls.crt"
    log = tmp_path / "mosquitto.log"
    broker = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    env = {"FSL_MQTT_USERNAME": "fsl-coordinator", "FSL_MQTT_CA_FILE": str(root / "tls" / "ca.crt"),
           "FSL_MQTT_PASSWORD": secret(kube, names.COORDINATOR_MQTT_SECRET)["password"].decode()}
    mtls = {"FSL_MQTT_CERT_FILE": str(root / "tls.crt"), "FSL_MQTT_KEY_FILE": str(root / "tls.key")}
    try:
        link = MqttLink(f"mqtts://127.0.0.1:{port}", "t-coordinator", [],
                        login=BrokerLogin.from_env({**env, **mtls}))
        link.start(timeout=10)
        link.stop()
        bare = MqttLink(f"mqtts://127.0.0.1:{port}", "t-bare", [], login=BrokerLogin.from_env(env))
        with pytest.raises(TransportError):  # the password alone no longer opens the broker
            bare.start(timeout=3)
    finally:
        broker.terminate()
        broker.wait(5)
    # a second deploy keeps the certificate (it is valid and from the same CA)
    assert deploy_to(kube, "--config", str(tmp_path / "deploy.yaml")) == 0
    assert secret(kube, names.COORDINATOR_CLIENT_TLS_SECRET) == client


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare(1) for a PID namespace like the pod's")
def test_the_reloader_applies_a_new_site_without_restarting_the_broker(kube, tmp_path):
    """The broker and the reloader sidecar as in the pod: one PID namespace of their own. A site
    added to the password file and ACL can connect after the reload, and a client already
    connected stays connected throughout."""
    import paho.mqtt.client as mqtt

    root, argv, script, port = deployed_broker(kube, tmp_path)
    ca_file = root / "tls" / "ca.crt"
    log = tmp_path / "pod.log"
    pod = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
         'mosquitto_argv="$1"; shift; "$@" & exec sh -c "$mosquitto_argv"', "pod", script, *argv],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        coordinator = secret(kube, names.COORDINATOR_MQTT_SECRET)["password"].decode()
        received: list[bytes] = []
        drops = threading.Event()
        watcher = _client(mqtt, ca_file, "fsl-coordinator", coordinator)
        watcher.on_message = lambda c, u, msg: received.append(msg.payload)
        watcher.on_disconnect = lambda *_: drops.set()
        watcher.on_connect = lambda c, *_: c.subscribe("fsl/demo/#", qos=1)
        _connect(watcher, port)
        watcher.loop_start()
        assert not _round_trip(mqtt, port, ca_file, "site-a", "a-secret")  # not enrolled yet

        auth = root / "auth"
        passwd = broker_auth.with_password((auth / "passwd").read_text(), "site-a", "a-secret")
        acl = broker_auth.with_acl((auth / "acl").read_text(), "site-a", ["fsl/demo/up/site-a"])
        for name, text in (("passwd", passwd), ("acl", acl)):  # swapped whole, as the kubelet does
            (auth / f".{name}.new").write_text(text)
            os.replace(auth / f".{name}.new", auth / name)

        deadline = time.monotonic() + 20
        while not _round_trip(mqtt, port, ca_file, "site-a", "a-secret", topic="fsl/demo/up/site-a"):
            assert time.monotonic() < deadline, log.read_text()
        assert "mosquitto reloaded" in log.read_text()
        assert not drops.is_set() and b"hello" in received  # the old connection saw the site's message
    finally:
        pod.kill()  # unshare --kill-child takes the namespace's processes with it
        pod.wait(5)


def _client(mqtt, ca_file, user: str, password: str):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(ca_file), cert_reqs=ssl.CERT_REQUIRED)  # checks the hostname too
    client.username_pw_set(user, password)
    return client


def _connect(client, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:  # the broker may still be starting
        try:
            client.connect("127.0.0.1", port)
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise AssertionError("the broker did not start") from None
            time.sleep(0.05)


def _round_trip(mqtt, port: int, ca_file, user: str, password: str, topic: str = "fsl/demo/up/x") -> bool:
    """Connect as `user`, subscribe to `topic` and publish on it; True if the message comes back."""
    got, refused = threading.Event(), threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            refused.set()
        else:
            client.subscribe(topic, qos=1)

    client = _client(mqtt, ca_file, user, password)
    client.on_connect = on_connect
    client.on_subscribe = lambda c, *_: c.publish(topic, b"hello", qos=1)
    client.on_message = lambda c, u, msg: got.set()
    _connect(client, port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not (got.is_set() or refused.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return got.is_set()
    finally:
        client.disconnect()
        client.loop_stop()


def test_no_wait_returns_once_applied(kube, capsys):
    kube.api.controllers = False  # nothing will ever be ready
    assert deploy_to(kube, "--no-wait") == 0
    err = capsys.readouterr().err
    assert "applied 16 objects" in err and "the load balancer has no address yet" in err

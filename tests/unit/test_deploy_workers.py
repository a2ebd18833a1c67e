"""Split-server workers in `fsl-edge deploy`: the `split_workers` settings and their checks, the
worker Deployment and autoscaler k8s/ renders for them, and their broker login and ACL entries.
The same ACL in a real Mosquitto is tests/integration/test_worker_acl.py."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest
import yaml
from cryptography import x509

from fsl_edge import protocol
from fsl_edge.deploy import broker_auth, names, topics
from fsl_edge.deploy.kube import StoredSecret
from fsl_edge.deploy.render import render
from fsl_edge.deploy.secrets import plan_secrets
from fsl_edge.deploy.settings import DeploySettings, load_deploy_settings
from fsl_edge.enroll import mosquitto
from fsl_edge.errors import ConfigError

from .test_k8s_manifests import K8S, by_kind, validate_strictly

PER_SITE = {"split": {"server": "per-site"}}
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl is not installed: k8s/ is rendered with `kubectl kustomize`")


def workers(replicas: int = 2, deploy: dict | None = None, **more) -> DeploySettings:
    return DeploySettings(training=PER_SITE, split_workers={"replicas": replicas, **more},
                          **(deploy or {}))


# --- settings -----------------------------------------------------------------------------------


def test_workers_are_off_by_default_and_bounded_by_replicas():
    s = DeploySettings()
    assert s.split_workers.replicas == 0 and s.training.split.server.value == "shared"
    w = workers(3).split_workers
    assert (w.replicas, w.ceiling, w.target_cpu_percent) == (3, 3, 70)  # no max: a fixed number
    assert workers(2, max_replicas=8).split_workers.ceiling == 8


@pytest.mark.parametrize("config, message", [
    ({"training": PER_SITE},
     "training.split.server is per-site, which only split-server workers serve, but "
     "split_workers.replicas is 0"),
    ({"split_workers": {"replicas": 2}},
     "split_workers.replicas is 2 but training.split.server is shared"),
    ({"training": PER_SITE, "split_workers": {"replicas": 3, "max_replicas": 2}},
     "split_workers.max_replicas (2) is below split_workers.replicas (3)"),
    ({"split_workers": {"max_replicas": 2}}, "split_workers.max_replicas needs split_workers.replicas >= 1"),
    ({"training": PER_SITE, "split_workers": {"replicas": -1}}, "split_workers.replicas"),
    ({"training": PER_SITE, "split_workers": {"replicas": 1, "target_cpu_percent": 0}},
     "split_workers.target_cpu_percent"),
])
def test_inconsistent_worker_settings_are_refused_naming_them(tmp_path, config, message):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as e:
        load_deploy_settings(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_workers_can_be_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("FSL_SPLIT_WORKERS__REPLICAS", "2")
    monkeypatch.setenv("FSL_TRAINING", '{"split": {"server": "per-site"}}')
    assert load_deploy_settings(None).split_workers.replicas == 2


# --- topics -------------------------------------------------------------------------------------


def test_the_workers_topics():
    assert topics.worker_topics() == [
        ("read", "fsl/+/agent/+/step"),  # what their $share/fsl-split/... subscription delivers
        ("read", "fsl/+/agent/+/step/+"),
        ("write", "fsl/+/agent/+/down"),
        ("read", "fsl/+/trunk"),
        ("write", "fsl/+/worker/+/up"),
        ("read", "fsl/+/broadcast"),
    ]


def test_a_sites_topics_widen_the_stand_ins_only():
    for name in ("run0", "agent", "step", "worker"):  # names that are also levels or ids
        entries = dict((topic, access) for access, topic in topics.node_topics(name))
        assert entries[f"fsl/+/agent/{name}/step"] == "write"
        assert entries[f"fsl/+/agent/{name}/step/+"] == "write"
        assert entries[f"fsl/+/agent/{name}/up"] == "write"


# --- rendering ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: k8s/ is rendered with `kubectl kustomize`")
    return {"off": render(DeploySettings(gpus=0)),
            "cpu": render(workers(2, max_replicas=6, target_cpu_percent=55,
                                  deploy={"gpus": 0, "namespace": "hospitals"})),
            "gpu-mtls": render(workers(1, deploy={"gpus": 2, "client_certificates": True}))}


def _worker(objects: list[dict], kind: str) -> dict | None:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == names.WORKER]
    return found[0] if found else None


def test_no_workers_render_nothing_of_theirs(rendered):
    assert _worker(rendered["off"], "Deployment") is None
    assert _worker(rendered["off"], "HorizontalPodAutoscaler") is None


def test_the_worker_deployment_runs_the_coordinator_image_and_config(rendered):
    objects = rendered["cpu"]
    deployment, (sts,) = _worker(objects, "Deployment"), by_kind(objects, "StatefulSet")
    assert deployment["metadata"]["namespace"] == "hospitals"
    assert "replicas" not in deployment["spec"]  # the autoscaler's field
    pod, coordinator_pod = deployment["spec"]["template"]["spec"], sts["spec"]["template"]["spec"]
    (container,), coordinator = pod["containers"], coordinator_pod["containers"][0]
    assert container["image"] == coordinator["image"]
    assert container["command"] == ["fsl-edge", "worker", "--config", coordinator["command"][-1]]
    assert pod["securityContext"]["runAsUser"] == coordinator_pod["securityContext"]["runAsUser"] == 10001
    assert "ports" not in container and "livenessProbe" not in container
    volumes = {v["name"]: v for v in pod["volumes"]}
    coordinator_volumes = {v["name"]: v for v in coordinator_pod["volumes"]}
    for name in ("config", "broker-ca", "node-keys"):  # the same ConfigMap (hashed name) and Secrets
        assert volumes[name] == coordinator_volumes[name]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert all(mounts[m["name"]] == m for m in coordinator["volumeMounts"] if m["name"] in volumes)

    env = {e["name"]: e.get("value") or e["valueFrom"] for e in container["env"]}
    assert env["FSL_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["FSL_MQTT_USERNAME"] == {"secretKeyRef": {"name": names.WORKER_MQTT_SECRET, "key": "username"}}
    assert env["FSL_MQTT_PASSWORD"] == {"secretKeyRef": {"name": names.WORKER_MQTT_SECRET, "key": "password"}}
    assert env["FSL_SHARE_GROUP"] == {"secretKeyRef": {"name": names.WORKER_MQTT_SECRET, "key": "share_group"}}
    coordinator_env = {e["name"]: e.get("value") or e["valueFrom"] for e in coordinator["env"]}
    for name in ("FSL_MQTT_CA_FILE", "FSL_NODE_KEYS_DIR", "FSL_COORDINATOR_SIGNING_KEY", "HF_HOME"):
        assert env[name] == coordinator_env[name]
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "tolerations" not in pod


def test_the_autoscaler_follows_the_settings(rendered):
    hpa = _worker(rendered["cpu"], "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.WORKER}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 55}}}]
    gpu = _worker(rendered["gpu-mtls"], "HorizontalPodAutoscaler")["spec"]
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["metrics"][0]["resource"]["name"]) == (1, 1, "cpu")


def test_gpu_workers_get_the_gpus_and_their_own_client_certificate(rendered):
    pod = _worker(rendered["gpu-mtls"], "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FSL_MQTT_CERT_FILE"] == f"{names.CLIENT_TLS_DIR}/tls.crt"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["client-tls"]["secret"]["secretName"] == names.WORKER_CLIENT_TLS_SECRET


def test_every_rendering_with_workers_validates_strictly(rendered):
    validate_strictly(rendered["cpu"] + rendered["gpu-mtls"])
    for objects in rendered.values():
        for workload in by_kind(objects, "Deployment"):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True


@needs_kubectl
def test_the_components_build_on_an_overlay_by_hand(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "fsl-edge", "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / c, tmp_path)
                       for c in ("split-workers", "split-workers-gpu")]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    objects = [o for o in yaml.safe_load_all(out) if o]
    deployment = _worker(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    (config,) = [cm["metadata"]["name"] for cm in by_kind(objects, "ConfigMap")
                 if cm["metadata"]["name"].startswith("fsl-coordinator-config")]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config
    assert _worker(objects, "HorizontalPodAutoscaler")["metadata"]["namespace"] == "fsl-edge"
    validate_strictly([deployment, _worker(objects, "HorizontalPodAutoscaler")])


# --- the broker login -----------------------------------------------------------------------------


def _read(stored: dict[str, dict[str, bytes]]):
    return lambda name: StoredSecret(stored[name], dict(names.LABELS), "7") if name in stored else None


def _written(plan) -> dict[str, dict[str, bytes]]:
    return {w["metadata"]["name"]: {k: base64.b64decode(v) for k, v in w["data"].items()}
            for w in plan.writes}


def _plan(stored, workers: bool, mtls: bool = False):
    return plan_secrets(_read(stored), "fed", ["fsl-broker"], mtls, workers)


def test_workers_get_one_login_with_their_acl_and_keep_it():
    first = _written(_plan({}, workers=True, mtls=True))
    login = first[names.WORKER_MQTT_SECRET]
    assert login["username"] == names.WORKER.encode()
    auth = first[names.BROKER_AUTH_SECRET]
    users = broker_auth.passwd_users(auth[names.PASSWD_KEY].decode())
    assert broker_auth.check_password(users[names.WORKER], login["password"].decode())
    assert broker_auth.acl_blocks(auth[names.ACL_KEY].decode())[1][names.WORKER] == [
        f"topic {access} {topic}" for access, topic in topics.worker_topics()]
    cert = x509.load_pem_x509_certificate(first[names.WORKER_CLIENT_TLS_SECRET]["tls.crt"])
    assert cert.subject.rfc4514_string() == f"CN={names.WORKER}"
    ca = first[names.BROKER_CA_SECRET]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca["tls.crt"]))

    again = _plan({**first}, workers=True, mtls=True)
    assert again.writes == [] and again.notes == []  # everything kept as it is


def test_the_workers_share_group_is_a_secret_made_once_and_added_to_an_older_login():
    first = _written(_plan({}, workers=True))
    group = first[names.WORKER_MQTT_SECRET]["share_group"].decode()
    assert len(group) == 32 and protocol.valid_id(group)
    assert group != _written(_plan({}, workers=True))[names.WORKER_MQTT_SECRET]["share_group"].decode()
    # a login made before the group existed keeps its password and gains a group
    older = {**first, names.WORKER_MQTT_SECRET: {k: v for k, v in first[names.WORKER_MQTT_SECRET].items()
                                                 if k != "share_group"}}
    plan = _plan(older, workers=True)
    login = _written(plan)[names.WORKER_MQTT_SECRET]
    assert login["password"] == first[names.WORKER_MQTT_SECRET]["password"] and login["share_group"]
    assert any("share_group" in n for n in plan.notes)


def test_without_workers_deploy_removes_their_login_and_only_theirs():
    stored = _written(_plan({}, workers=True))
    site_passwd = mosquitto.passwd_add(stored[names.BROKER_AUTH_SECRET][names.PASSWD_KEY].decode(), "alice", "pw")
    site_acl = mosquitto.acl_add(stored[names.BROKER_AUTH_SECRET][names.ACL_KEY].decode(), "alice")
    stored[names.BROKER_AUTH_SECRET] = {names.PASSWD_KEY: site_passwd.encode(), names.ACL_KEY: site_acl.encode()}
    plan = _plan(stored, workers=False)
    auth = _written(plan)[names.BROKER_AUTH_SECRET]
    assert set(broker_auth.passwd_users(auth[names.PASSWD_KEY].decode())) == {names.COORDINATOR, "alice"}
    blocks = broker_auth.acl_blocks(auth[names.ACL_KEY].decode())[1]
    assert set(blocks) == {names.COORDINATOR, "alice"}
    assert "# fsl-edge node alice" in auth[names.ACL_KEY].decode()
    assert any("removed the split-server workers' broker login" in n for n in plan.notes)


def test_a_site_enrolled_as_fsl_worker_is_never_taken_over():
    stored = _written(_plan({}, workers=False))
    passwd = mosquitto.passwd_add(stored[names.BROKER_AUTH_SECRET][names.PASSWD_KEY].decode(), names.WORKER, "pw")
    acl = mosquitto.acl_add(stored[names.BROKER_AUTH_SECRET][names.ACL_KEY].decode(), names.WORKER)
    stored[names.BROKER_AUTH_SECRET] = {names.PASSWD_KEY: passwd.encode(), names.ACL_KEY: acl.encode()}
    stored[names.NODE_KEYS_SECRET] = {names.WORKER: b"key"}
    assert _plan(stored, workers=False).writes == []  # not deploy's login: left alone
    with pytest.raises(ConfigError, match="a site is enrolled as 'fsl-worker'.*fsl-edge revoke fsl-worker"):
        _plan(stored, workers=True)


def test_sites_enrolled_before_the_workers_gain_their_step_topics():
    stored = _written(_plan({}, workers=False))
    old = lambda name: "".join(line + "\n" for line in mosquitto.acl_block(name).splitlines()  # noqa: E731
                               if "/step" not in line) + "\n"
    acl = stored[names.BROKER_AUTH_SECRET][names.ACL_KEY].decode() + "\n" + old("alice") + mosquitto.acl_block("bob")
    stored[names.BROKER_AUTH_SECRET] = {names.PASSWD_KEY: b"", names.ACL_KEY: acl.encode()}
    stored[names.NODE_KEYS_SECRET] = {"alice": b"k", "bob": b"k"}
    unchanged = _written(_plan(stored, workers=False))[names.BROKER_AUTH_SECRET][names.ACL_KEY].decode()
    assert "alice/step" not in unchanged  # without workers, deploy leaves the sites' blocks alone
    plan = _plan(stored, workers=True)
    new = _written(plan)[names.BROKER_AUTH_SECRET][names.ACL_KEY].decode()
    blocks = broker_auth.acl_blocks(new)[1]
    for site in ("alice", "bob"):
        assert sorted(blocks[site]) == sorted(f"topic {a} {t}" for a, t in topics.node_topics(site))
    assert "added the step topics to the ACL of sites enrolled before split-server workers: alice" in plan.notes
    assert new.startswith(acl.split("# fsl-edge node alice")[0])  # the lines above alice's block stay
    assert mosquitto.acl_remove(new, "alice").count("user alice") == 0  # revoke still finds the block


def test_acl_entries_are_added_and_removed_without_touching_other_lines():
    acl = "# global\nuser a\ntopic read x\n# note\n\nuser b\ntopic read y\n"
    assert broker_auth.with_acl_entries(acl, "a", [("read", "x"), ("write", "z")]) == (
        "# global\nuser a\ntopic read x\ntopic write z\n# note\n\nuser b\ntopic read y\n")
    assert broker_auth.with_acl_entries(acl, "a", [("read", "x")]) == acl
    assert broker_auth.with_acl_entries(acl, "c", [("read", "x")]) == acl
    passwd, left = broker_auth.without_user("a:h1\n# c\nb:h2\n", acl, "a")
    assert (passwd, left) == ("# c\nb:h2\n", "# global\n# note\n\nuser b\ntopic read y\n")


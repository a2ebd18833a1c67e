"""k8s/ and its rendering: kustomize builds every overlay, every manifest validates strictly
against Kubernetes 1.29-1.33, and the manifests agree with the names enroll and the coordinator use."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv

from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.deploy import names
from fsl_edge.deploy.render import coordinator_config, kustomization, manifests_root, render
from fsl_edge.deploy.settings import DeploySettings

K8S = manifests_root()
VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/cpu"]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl is not installed: k8s/ is rendered with `kubectl kustomize`")

# Every way the deployment config changes the manifests, each value at least once (kustomize
# takes ~0.4 s a render, so not the full product): CPU or 1-2 GPUs, each exposure with and
# without a host and a pinned node port, a storage class or not, images by tag or digest.
LB, NODEPORT, NONE = "loadbalancer", "nodeport", "none"
COMBINATIONS = [
    dict(gpus=0, expose={"mode": LB}),
    dict(gpus=1, expose={"mode": LB, "host": "mqtt.example.org"}, storage={"class_name": "fast-ssd", "size": "50Gi"}),
    dict(gpus=2, expose={"mode": NODEPORT}),
    dict(gpus=1, expose={"mode": NODEPORT, "node_port": 30883, "host": "203.0.113.5"}, storage={"class_name": "standard"}),
    dict(gpus=0, expose={"mode": NONE, "host": "mqtt.example.org"}, storage={"size": "5Gi"}),
    dict(gpus=1, expose={"mode": NONE}),
    dict(namespace="hospitals", images={
        "coordinator": {"name": "registry.example.org/fsl/coordinator", "tag": "sha256:" + "a" * 64},
        "broker": {"name": "registry.example.org/mirror/eclipse-mosquitto", "tag": "2.0.21-openssl"}}),
]


@pytest.fixture(autouse=True, scope="module")
def cached_schemas():
    """kubernetes-validate re-reads its schema files (megabytes of JSON) for every object: read
    each once. They are pure data, never mutated by the validator."""
    original = kv.schema_contents
    kv.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    kv.schema_contents = original


def kubectl_kustomize(folder: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def validate_strictly(objects: list[dict]) -> None:
    """kubernetes-validate --strict for every version; identical objects are checked once."""
    seen: set[str] = set()
    for obj in objects:
        key = json.dumps(obj, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        for version in VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(map(str, e.path))
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes "
                            f"{version} at {path}: {e.message}")


@pytest.fixture(scope="module")
def rendered() -> list[list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: k8s/ is rendered with `kubectl kustomize`")
    return [render(DeploySettings(**c)) for c in COMBINATIONS]


@needs_kubectl
@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_kubectl_kustomize_builds_every_overlay_and_it_validates(folder):
    objects = kubectl_kustomize(K8S / folder)
    assert {o["kind"] for o in objects} == {"Namespace", "ConfigMap", "Service", "Deployment",
                                           "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"}
    validate_strictly(objects)


@needs_kubectl
@pytest.mark.parametrize("component", ["expose-loadbalancer", "expose-nodeport"])
def test_each_exposure_component_builds_on_the_base(tmp_path, component):
    # kustomize refuses absolute paths: reference k8s/ relative to the overlay
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / component, tmp_path)]}))
    (service,) = [o for o in kubectl_kustomize(tmp_path) if o["kind"] == "Service" and o["metadata"]["name"] == names.BROKER]
    assert service["spec"]["type"] == {"expose-loadbalancer": "LoadBalancer", "expose-nodeport": "NodePort"}[component]


def test_every_rendered_combination_validates_strictly(rendered):
    validate_strictly([obj for objects in rendered for obj in objects])


def test_rendering_applies_the_config(rendered):
    for config, objects in zip(COMBINATIONS, rendered, strict=True):
        s = DeploySettings(**config)
        assert all(o["metadata"].get("namespace", s.namespace) == s.namespace for o in objects)
        assert by_kind(objects, "Namespace")[0]["metadata"]["name"] == s.namespace
        (sts,) = by_kind(objects, "StatefulSet")
        container = sts["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (s.gpus or None)
        tolerations = sts["spec"]["template"]["spec"].get("tolerations", [])
        assert bool(tolerations) == bool(s.gpus)
        claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
        assert claim["resources"]["requests"]["storage"] == s.storage.size
        assert claim.get("storageClassName") == s.storage.class_name
        image = s.images.coordinator
        sep = "@" if image.tag.startswith("sha256:") else ":"
        assert container["image"] == f"{image.name}{sep}{image.tag}"
        (broker,) = by_kind(objects, "Deployment")
        assert {c["image"] for c in broker["spec"]["template"]["spec"]["containers"]} == {
            f"{s.images.broker.name}:{s.images.broker.tag}"}
        (service,) = [o for o in by_kind(objects, "Service") if o["metadata"]["name"] == names.BROKER]
        assert service["spec"]["type"] == {"loadbalancer": "LoadBalancer", "nodeport": "NodePort",
                                           "none": "ClusterIP"}[s.expose.mode.value]
        assert service["spec"]["ports"][0].get("nodePort") == s.expose.node_port


def test_the_coordinator_config_is_what_the_coordinator_accepts(rendered):
    base_file = yaml.safe_load((K8S / "base" / "config" / "coordinator.yaml").read_text())
    configs = [base_file] + [
        yaml.safe_load(next(iter(cm["data"].values())))
        for objects in rendered for cm in by_kind(objects, "ConfigMap")
        if cm["metadata"]["name"].startswith("fsl-coordinator-config")]
    assert len(configs) == len(COMBINATIONS) + 1
    for config in configs:
        settings = CoordinatorSettings.model_validate(config)
        assert settings.runtime.broker == f"mqtts://{names.BROKER}:{names.BROKER_PORT}"
        assert settings.status_port == names.STATUS_PORT and settings.status_host == "0.0.0.0"


def test_the_run_settings_reach_the_coordinator():
    s = DeploySettings(model="tiny-random-llama", min_agents=3, quorum=2, gpus=0,
                       training={"lora": {"rank": 4}, "train": {"rounds": 7}},
                       runtime={"run_id": "hospitals", "max_packet": 65536})
    settings = CoordinatorSettings.model_validate(coordinator_config(s))
    assert (settings.model, settings.min_agents, settings.quorum, settings.device) == ("tiny-random-llama", 3, 2, "cpu")
    assert settings.training == s.training
    assert (settings.runtime.run_id, settings.runtime.max_packet) == ("hospitals", 65536)


def test_the_manifests_use_the_names_enroll_and_the_coordinator_share(rendered):
    objects = rendered[0]
    (sts,) = by_kind(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["fsl-edge", "coordinator", "--config", "/etc/fsl-edge/coordinator.yaml"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"status": names.STATUS_PORT}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["FSL_MQTT_USERNAME"] == {"name": names.COORDINATOR_MQTT_SECRET, "key": "username"}
    assert env["FSL_MQTT_PASSWORD"] == {"name": names.COORDINATOR_MQTT_SECRET, "key": "password"}
    assert env["FSL_MQTT_CA_FILE"] == names.CA_FILE
    assert env["FSL_NODE_KEYS_DIR"] == names.NODE_KEYS_DIR
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["node-keys"]["secret"] == {"secretName": names.NODE_KEYS_SECRET, "optional": True,
                                              "defaultMode": 0o440}
    assert mounts["node-keys"] == names.NODE_KEYS_DIR
    assert volumes["broker-ca"]["secret"]["secretName"] == names.BROKER_TLS_SECRET
    assert f"{mounts['broker-ca']}/ca.crt" == names.CA_FILE

    (broker,) = by_kind(objects, "Deployment")
    pod = broker["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True  # the reloader signals mosquitto
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == names.BROKER_AUTH_SECRET
    assert volumes["tls"]["secret"]["secretName"] == names.BROKER_TLS_SECRET
    mosquitto, reloader = pod["containers"]
    assert reloader["volumeMounts"] == [m for m in mosquitto["volumeMounts"] if m["name"] != "config"]
    (conf_map,) = [cm for cm in by_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith("fsl-broker-config")]
    conf = conf_map["data"]["mosquitto.conf"]
    auth_dir = {m["name"]: m["mountPath"] for m in mosquitto["volumeMounts"]}["auth"]
    tls_dir = {m["name"]: m["mountPath"] for m in mosquitto["volumeMounts"]}["tls"]
    for line in (f"password_file {auth_dir}/{names.PASSWD_KEY}", f"acl_file {auth_dir}/{names.ACL_KEY}",
                 f"listener {names.BROKER_PORT}", f"cafile {tls_dir}/ca.crt",
                 f"certfile {tls_dir}/tls.crt", f"keyfile {tls_dir}/tls.key", "allow_anonymous false"):
        assert line in conf.splitlines()
    assert f"{auth_dir}/passwd" in reloader["command"][-1] and f"{tls_dir}/*" in reloader["command"][-1]


def test_pods_run_unprivileged_with_read_only_roots(rendered):
    for workload in by_kind(rendered[0], "Deployment") + by_kind(rendered[0], "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_the_generated_overlay_only_references_k8s(tmp_path):
    k = kustomization(DeploySettings(gpus=0, expose={"mode": "nodeport"}), K8S, tmp_path)
    for ref in k["resources"] + k["components"]:
        assert (tmp_path / ref).resolve().is_relative_to(K8S)
    assert k["configMapGenerator"][0]["behavior"] == "replace"


def test_strict_validation_catches_an_unknown_field():
    # guards the guard: a misspelt field must fail, not pass silently
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"ports": [{"port": 1}], "externalTrafficPolicyy": "Local"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(service, "1.29", strict=True)

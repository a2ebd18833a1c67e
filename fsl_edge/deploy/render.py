"""Render k8s/ with a deployment config's values: `kubectl kustomize` on a generated overlay.

k8s/ stays the one copy of the manifests. Rendering writes a kustomization into a temporary
folder that references the base's overlay and components and sets only what the config
decides (namespace, images, the coordinator's and the broker's config files, GPUs, storage,
node port, mutual TLS, the split-server workers and their autoscaler), then runs kustomize on
it. No cluster is contacted.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from fsl_edge.config import RuntimeSettings
from fsl_edge.errors import ConfigError

from . import names
from .settings import DeploySettings, Exposure

CHECKPOINT_DIR = Path("/var/lib/fsl-edge/checkpoints")
"""On the coordinator's volume (k8s/base/coordinator-statefulset.yaml mounts it)."""
BASE_IMAGES = {"coordinator": "fsl-edge-coordinator", "broker": "eclipse-mosquitto"}
"""The image names k8s/ uses, which kustomize's `images` replace."""


def manifests_root() -> Path:
    """The k8s/ tree: the checkout's, or the copy an installed wheel ships as fsl_edge/k8s."""
    candidates = [Path(__file__).resolve().parents[2] / "k8s"]
    spec = importlib.util.find_spec("fsl_edge.k8s")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    for root in candidates:
        if (root / "base" / "kustomization.yaml").is_file():
            return root
    raise ConfigError("the k8s/ manifests are not installed with fsl-edge "
                      f"(looked in {', '.join(map(str, candidates))})")


def coordinator_config(s: DeploySettings) -> dict:
    """The coordinator's settings file in the cluster: the config's run, the deployed broker.

    The keys are fsl_edge.coordinator.settings.CoordinatorSettings' (the core does not import
    the coordinator package; tests/unit/test_k8s_manifests.py validates the result with it).
    """
    runtime = RuntimeSettings.model_validate(
        {**s.runtime.model_dump(), "broker": f"mqtts://{names.BROKER}:{names.BROKER_PORT}"})
    return {"model": s.model, "training": s.training.model_dump(mode="json", exclude_none=True),
            "runtime": runtime.model_dump(mode="json", exclude_none=True),
            "device": "cuda" if s.gpus else "cpu", "min_agents": s.min_agents,
            "max_agents": s.max_agents, "quorum": s.quorum,
            "checkpoint_dir": str(CHECKPOINT_DIR), "status_host": "0.0.0.0",
            "status_port": names.STATUS_PORT}


def coordinator_yaml(s: DeploySettings) -> str:
    body = yaml.safe_dump(coordinator_config(s), sort_keys=False)
    return "# Written by `fsl-edge deploy` from its deployment config.\n" + body


def kustomization(s: DeploySettings, root: Path, workdir: Path) -> dict:
    """The generated overlay, with paths into `root` relative to `workdir` (kustomize wants that)."""
    def rel(*parts: str) -> str:
        return os.path.relpath(root.joinpath(*parts), workdir)

    sts = {"kind": "StatefulSet", "name": names.COORDINATOR}
    claim = "/spec/volumeClaimTemplates/0/spec"
    storage_ops = [{"op": "replace", "path": f"{claim}/resources/requests/storage",
                    "value": s.storage.size}]
    if s.storage.class_name:
        storage_ops.append({"op": "add", "path": f"{claim}/storageClassName",
                            "value": s.storage.class_name})
    patches = [{"target": sts, "patch": yaml.safe_dump(storage_ops)}]
    if s.gpus:
        patches.append({"target": sts, "patch": yaml.safe_dump([gpu_op(s.gpus)])})
    if s.expose.node_port is not None:
        patches.append({"target": {"kind": "Service", "name": names.BROKER},
                        "patch": yaml.safe_dump([{"op": "add", "path": "/spec/ports/0/nodePort",
                                                  "value": s.expose.node_port}])})
    generated = [{"name": "fsl-coordinator-config", "behavior": "replace", "files": ["coordinator.yaml"]}]
    if s.client_certificates:
        patches.append({"target": sts, "patch": yaml.safe_dump(
            client_tls_ops(names.COORDINATOR_CLIENT_TLS_SECRET))})
        generated.append({"name": "fsl-broker-config", "behavior": "replace",
                          "files": ["mosquitto.conf"]})
    components = [] if s.expose.mode is Exposure.NONE else [rel("components", f"expose-{s.expose.mode.value}")]
    if s.split_workers.replicas:
        components.append(rel("components", "split-workers"))
        if s.gpus:
            components.append(rel("components", "split-workers-gpu"))
        patches += worker_patches(s)
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [rel("overlays", "gpu" if s.gpus else "cpu")],
        "components": components,
        "namespace": s.namespace,
        "images": [_image(BASE_IMAGES["coordinator"], s.images.coordinator),
                   _image(BASE_IMAGES["broker"], s.images.broker)],
        "configMapGenerator": generated,
        "patches": patches,
    }


def worker_patches(s: DeploySettings) -> list[dict]:
    """The split-server workers' GPUs and client certificate, and their autoscaler's bounds."""
    workers = {"kind": "Deployment", "name": names.WORKER}
    ops = [gpu_op(s.gpus)] if s.gpus else []
    if s.client_certificates:
        ops += client_tls_ops(names.WORKER_CLIENT_TLS_SECRET)
    hpa = [{"op": "replace", "path": "/spec/minReplicas", "value": s.split_workers.replicas},
           {"op": "replace", "path": "/spec/maxReplicas", "value": s.split_workers.ceiling},
           {"op": "replace", "path": "/spec/metrics/0/resource/target/averageUtilization",
            "value": s.split_workers.target_cpu_percent}]
    return ([{"target": workers, "patch": yaml.safe_dump(ops)}] if ops else []) + [
        {"target": {"kind": "HorizontalPodAutoscaler", "name": names.WORKER},
         "patch": yaml.safe_dump(hpa)}]


def gpu_op(gpus: int) -> dict:
    """The JSON-patch op setting a workload's first container's GPU count."""
    return {"op": "replace", "value": gpus,
            "path": "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu"}


def broker_conf(root: Path, client_certificates: bool) -> str:
    """k8s/'s mosquitto.conf; with mutual TLS, its TLS listener also demands a client
    certificate from the broker CA (`cafile`), besides the password it always demands."""
    text = (root / "base" / "config" / "mosquitto.conf").read_text()
    if not client_certificates:
        return text
    anchor = "\ntls_version "
    if anchor not in text:  # the listener's TLS block is where require_certificate belongs
        raise ConfigError("k8s/base/config/mosquitto.conf has no `tls_version` line to put "
                          "`require_certificate true` after")
    at = text.index("\n", text.index(anchor) + 1)
    return (text[:at] + "\n# mutual TLS (`client_certificates`): a client shows a certificate "
            "from the CA too\nrequire_certificate true" + text[at:])


def client_tls_ops(secret: str) -> list[dict]:
    """JSON-patch ops giving a workload its client certificate (mutual TLS) from `secret`."""
    spec = "/spec/template/spec"
    env = [{"name": "FSL_MQTT_CERT_FILE", "value": f"{names.CLIENT_TLS_DIR}/tls.crt"},
           {"name": "FSL_MQTT_KEY_FILE", "value": f"{names.CLIENT_TLS_DIR}/tls.key"}]
    return [*({"op": "add", "path": f"{spec}/containers/0/env/-", "value": e} for e in env),
            {"op": "add", "path": f"{spec}/containers/0/volumeMounts/-",
             "value": {"name": "client-tls", "mountPath": names.CLIENT_TLS_DIR, "readOnly": True}},
            {"op": "add", "path": f"{spec}/volumes/-", "value": {
                "name": "client-tls", "secret": {"secretName": secret, "defaultMode": 0o440}}}]


def render(s: DeploySettings) -> list[dict]:
    """Every object of the deployment, in the order kustomize gives (the namespace first)."""
    root = manifests_root()
    with tempfile.TemporaryDirectory(prefix="fsl-edge-deploy-") as tmp:
        workdir = Path(tmp)
        (workdir / "coordinator.yaml").write_text(coordinator_yaml(s))
        (workdir / "mosquitto.conf").write_text(broker_conf(root, s.client_certificates))
        (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization(s, root, workdir)))
        out = kustomize(workdir)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kustomize(folder: Path) -> str:
    """`kubectl kustomize folder` (or a standalone `kustomize build`); ConfigError if neither runs."""
    if kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(folder)]
    elif standalone := shutil.which("kustomize"):
        argv = [standalone, "build", str(folder)]
    else:
        raise ConfigError("rendering k8s/ needs kubectl (it runs `kubectl kustomize`): install "
                          "kubectl, or kustomize")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{' '.join(argv[:2])} failed: {e}") from e
    if done.returncode != 0:
        raise ConfigError(f"{' '.join(argv[:2])} failed: {' '.join(done.stderr.split())}")
    return done.stdout


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (config files in ConfigMaps) as literal blocks, readable in a diff."""


_Dumper.add_representer(str, lambda dumper, data: dumper.represent_scalar(
    "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None))


def to_yaml(objects: list[dict]) -> str:
    """A multi-document YAML stream of `objects`."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def write_output(objects: list[dict], folder: Path) -> list[Path]:
    """One file per object and a kustomization.yaml listing them: `kubectl apply -k folder` works."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for obj in objects:
        path = folder / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(to_yaml([obj]))
        files.append(path)
    listing = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
               "resources": [f.name for f in files]}
    (folder / "kustomization.yaml").write_text(
        "# Rendered by `fsl-edge deploy --output`; the Secrets the pods mount are not here\n"
        "# (see README, \"Deploying to Kubernetes\").\n" + yaml.safe_dump(listing, sort_keys=False))
    return files


def _image(name: str, image) -> dict:
    entry = {"name": name, "newName": image.name}
    if image.tag.startswith("sha256:"):
        entry["digest"] = image.tag
    else:
        entry["newTag"] = image.tag
    return entry

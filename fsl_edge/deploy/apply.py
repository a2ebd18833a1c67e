"""`fsl-edge deploy`: render k8s/, plan the Secrets, apply everything, wait, say where sites connect.

Everything that can fail without changing the cluster runs before the first write: rendering,
reaching the API server, the immutable-field check and the Secret plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fsl_edge.errors import ConfigError

from . import names, pki, rollout
from .kube import Cluster
from .render import render, write_output
from .secrets import managed, plan_secrets, server_certificate
from .settings import DeploySettings, Exposure


@dataclass
class DeployResult:
    """What deploy did and what sites need to know."""

    objects: list[dict]
    """The rendered manifests (no Secrets)."""
    applied: list[str] = field(default_factory=list)
    """kind/name of every object applied, Secrets included."""
    notes: list[str] = field(default_factory=list)
    endpoint: str | None = None
    """mqtts://host:port sites connect to, when known."""
    endpoint_hint: str = ""
    """How to reach the broker when the endpoint is not known (or a caveat when it is)."""
    context: str | None = None
    server_version: str | None = None


def deploy(settings: DeploySettings, *, dry_run: bool = False, output: Path | None = None,
           wait: bool = True, console: Console | None = None) -> DeployResult:
    """Render, and unless dry_run/output, apply to the cluster and wait for the rollout."""
    console = console or Console(stderr=True)
    objects = render(settings)
    result = DeployResult(objects)
    if output is not None:
        write_output(objects, output)
    if dry_run or output is not None:
        return result

    ns = settings.namespace
    with Cluster(settings.context, settings.kubeconfig) as cluster:
        result.context = cluster.context
        result.server_version = cluster.server_version()
        _check_immutable(cluster, settings, objects)
        broker_names = pki.broker_names(ns, names.BROKER, settings.expose.host)
        workers = settings.split_workers.replicas > 0
        plan = plan_secrets(lambda name: cluster.get_secret(ns, name), ns, broker_names,
                            settings.client_certificates, workers)
        result.notes += plan.notes

        namespace = [o for o in objects if o["kind"] == "Namespace"]
        stored = {}
        for obj in namespace + plan.writes + [o for o in objects if o["kind"] != "Namespace"]:
            stored[(obj["kind"], obj["metadata"]["name"])] = cluster.apply(obj)
            result.applied.append(f"{obj['kind'].lower()}/{obj['metadata']['name']}")
        if not workers:
            _remove_workers(cluster, ns, result)

        service = stored[("Service", names.BROKER)]
        needs_address = settings.expose.mode is Exposure.LOADBALANCER and not settings.expose.host
        address = rollout.load_balancer_address(service) if needs_address else None
        if wait:
            checks = [rollout.workload(cluster, ns, "apps/v1", "Deployment", names.BROKER),
                      rollout.workload(cluster, ns, "apps/v1", "StatefulSet", names.COORDINATOR)]
            if workers:
                checks.append(rollout.workload(cluster, ns, "apps/v1", "Deployment", names.WORKER))
            found: list[str] = []
            if needs_address:
                check, found = rollout.load_balancer(cluster, ns, names.BROKER)
                checks.append(check)
            rollout.wait_for(checks, settings.rollout_timeout_s, console)
            address = found[0] if found else address
        if address:
            _cover_address(cluster, ns, broker_names + [address], plan.ca, result)
        _endpoint(settings, service, address, result)
    return result


def _check_immutable(cluster: Cluster, s: DeploySettings, objects: list[dict]) -> None:
    """Refuse, before any write, a storage change the API server would refuse halfway through."""
    current = cluster.get("apps/v1", "StatefulSet", s.namespace, names.COORDINATOR)
    if current is None:
        return
    rendered = next(o for o in objects if o["kind"] == "StatefulSet")
    old = (current["spec"].get("volumeClaimTemplates") or [{}])[0]
    new = rendered["spec"]["volumeClaimTemplates"][0]
    old_size = old.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
    old_class = old.get("spec", {}).get("storageClassName")
    if old_size != s.storage.size or (s.storage.class_name and old_class != s.storage.class_name):
        raise ConfigError(
            f"storage cannot change on a deployed coordinator (it has {old_size}"
            f"{f' of class {old_class}' if old_class else ''}; the config asks "
            f"{new['spec']['resources']['requests']['storage']}"
            f"{f' of class {s.storage.class_name}' if s.storage.class_name else ''}): a "
            "StatefulSet's volume claims are immutable; keep the old values, or resize the "
            "PVC itself (kubectl edit pvc)")


def _remove_workers(cluster: Cluster, ns: str, result: DeployResult) -> None:
    """Delete the split-server workers a former deploy made: their broker login is gone."""
    removed = [kind for api, kind in (("autoscaling/v2", "HorizontalPodAutoscaler"),
                                      ("apps/v1", "Deployment"))
               if cluster.delete(api, kind, ns, names.WORKER)]
    if removed:
        result.notes.append(f"removed the split-server workers ({' and '.join(removed)} "
                            f"{names.WORKER}): split_workers.replicas is 0")


def _cover_address(cluster: Cluster, ns: str, broker_names: list[str], ca, result) -> None:
    """Re-issue the broker certificate so it names the load balancer's address sites will use."""
    tls = cluster.get_secret(ns, names.BROKER_TLS_SECRET)
    if tls is None or not managed(tls) or ca is None:
        result.notes.append(f"warning: make sure the broker certificate names {broker_names[-1]}")
        return
    if pki.needs_reissue(tls.data["tls.crt"], ca.cert, broker_names) is None:
        return
    cluster.apply(server_certificate(ca, ns, broker_names))
    result.applied.append(f"secret/{names.BROKER_TLS_SECRET}")
    result.notes.append(f"re-issued the broker certificate for the load balancer's address "
                        f"{broker_names[-1]} (the broker reloads it within a minute)")


def _endpoint(s: DeploySettings, service: dict, address: str | None, result: DeployResult) -> None:
    in_cluster = f"{names.BROKER}.{s.namespace}.svc:{names.BROKER_PORT}"
    if s.expose.mode is Exposure.NODEPORT:
        port = service.get("spec", {}).get("ports", [{}])[0].get("nodePort") or s.expose.node_port
        if s.expose.host and port:
            result.endpoint = f"mqtts://{s.expose.host}:{port}"
        else:
            result.endpoint_hint = (f"sites connect to a node's address on node port {port or '?'}; "
                                    "set expose.host to the name they use, so that the "
                                    "broker certificate names it")
    elif s.expose.mode is Exposure.LOADBALANCER:
        host = s.expose.host or address
        if host:
            result.endpoint = f"mqtts://{host}:{names.BROKER_PORT}"
        else:
            result.endpoint_hint = (f"the load balancer has no address yet: `kubectl -n "
                                    f"{s.namespace} get service {names.BROKER}`, then deploy again")
    elif s.expose.host:
        result.endpoint = f"mqtts://{s.expose.host}:{names.BROKER_PORT}"
        result.endpoint_hint = f"through your TCP proxy (TLS passthrough) to {in_cluster}"
    else:
        result.endpoint_hint = (f"point a TCP proxy (TLS passthrough) at {in_cluster} and set "
                                "expose.host to its name")

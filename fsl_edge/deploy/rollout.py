"""Wait until the deployed workloads are ready (and the load balancer has an address), with progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fsl_edge.errors import TemporaryError

from .kube import Cluster


@dataclass
class Check:
    """One thing to wait for: `poll()` answers (done, what to show)."""

    label: str
    poll: Callable[[], tuple[bool, str]]


def workload(cluster: Cluster, namespace: str, api_version: str, kind: str, name: str) -> Check:
    """Ready when the controller has seen the latest spec and every replica is updated and ready."""
    def poll() -> tuple[bool, str]:
        obj = cluster.get(api_version, kind, namespace, name) or {}
        want = obj.get("spec", {}).get("replicas", 1)
        status = obj.get("status") or {}
        ready = status.get("availableReplicas" if kind == "Deployment" else "readyReplicas", 0)
        seen = status.get("observedGeneration", 0) >= obj.get("metadata", {}).get("generation", 1)
        same_revision = status.get("currentRevision") == status.get("updateRevision")
        done = (seen and same_revision and status.get("updatedReplicas", 0) == want
                and ready == want and status.get("replicas", 0) == want)
        return done, f"{ready}/{want} ready"
    return Check(f"{kind.lower()}/{name}", poll)


def load_balancer_address(service: dict) -> str | None:
    """The address a Service's load balancer got (a hostname or an IP), or None yet."""
    for ingress in (service.get("status") or {}).get("loadBalancer", {}).get("ingress") or []:
        if address := ingress.get("hostname") or ingress.get("ip"):
            return address
    return None


def load_balancer(cluster: Cluster, namespace: str, service: str) -> tuple[Check, list[str]]:
    """Done once the Service's load balancer has an address; the list receives it."""
    found: list[str] = []

    def poll() -> tuple[bool, str]:
        address = load_balancer_address(cluster.get("v1", "Service", namespace, service) or {})
        found[:] = [address] if address else []
        return (True, address) if address else (False, "waiting for an address")
    return Check(f"service/{service} load balancer", poll), found


def wait_for(checks: list[Check], timeout_s: float, console: Console, interval_s: float = 2.0,
             sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll every check until all are done; TemporaryError naming the stragglers after timeout_s."""
    deadline = time.monotonic() + timeout_s
    columns = (SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
               TextColumn("[dim]{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks = {c.label: progress.add_task(c.label, total=1, detail="") for c in checks}
        pending = {c.label: c for c in checks}
        details: dict[str, str] = {}
        while True:
            for label, check in list(pending.items()):
                done, details[label] = check.poll()
                progress.update(tasks[label], completed=int(done), detail=details[label])
                if done:
                    del pending[label]
            if not pending:
                return
            if time.monotonic() >= deadline:
                late = ", ".join(f"{label} ({details[label]})" for label in pending)
                raise TemporaryError(f"not ready after {timeout_s:.0f} s: {late}; see "
                                     "`kubectl get pods` and `kubectl describe` in the namespace, "
                                     "then run deploy again")
            sleep(max(0.05, min(interval_s, deadline - time.monotonic())))

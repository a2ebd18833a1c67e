"""The Kubernetes API through the maintained `kubernetes` client: server-side apply, reads, Secrets.

`Cluster(context)` talks to one cluster with the user's kubeconfig. Every write is a server-side
apply with field manager `fsl-edge`, so re-applying the same object changes nothing and fields
other tools own are left alone. Every failure becomes one line of an fsl-edge error.

`fsl-edge status` reads the coordinator's status API with `proxy_get`, through the API server's
service proxy. `fsl-edge enroll` uses `read_secret` / `write_secret` on the same client. A
server-side apply replaces *all* the fields its field manager owns: write a Secret's complete
data each time (read, change, write), never just the key that changed, or the keys left out are
removed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fsl_edge.errors import ConfigError, FslError, ProtocolError, TemporaryError, TransportError

from .names import FIELD_MANAGER

# (apiVersion, kind) -> (API class of kubernetes.client, method suffix, namespaced). Only the
# kinds k8s/ holds: a table beats a discovery round-trip per group on every deploy.
_KINDS: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("CoreV1Api", "namespace", False),
    ("v1", "ConfigMap"): ("CoreV1Api", "namespaced_config_map", True),
    ("v1", "Secret"): ("CoreV1Api", "namespaced_secret", True),
    ("v1", "Service"): ("CoreV1Api", "namespaced_service", True),
    ("apps/v1", "StatefulSet"): ("AppsV1Api", "namespaced_stateful_set", True),
    ("apps/v1", "Deployment"): ("AppsV1Api", "namespaced_deployment", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("NetworkingV1Api", "namespaced_network_policy", True),
    ("policy/v1", "PodDisruptionBudget"): ("PolicyV1Api", "namespaced_pod_disruption_budget", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("AutoscalingV2Api",
                                                    "namespaced_horizontal_pod_autoscaler", True),
}
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"


@dataclass(frozen=True)
class StoredSecret:
    """A Secret as the cluster holds it: decoded data, labels, and its resourceVersion."""

    data: dict[str, bytes]
    labels: dict[str, str]
    resource_version: str | None


def kubeconfig_path(kubeconfig: Path | None) -> str:
    """The kubeconfig to read: the given file, else $KUBECONFIG (may list several), else ~/.kube/config."""
    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or "~/.kube/config"
    files = [Path(p).expanduser() for p in path.split(os.pathsep) if p]
    if not any(f.is_file() for f in files):
        raise ConfigError(f"no kubeconfig at {path}: point --kubeconfig or KUBECONFIG at one "
                          "(or use --dry-run to render without a cluster)")
    return path


class Cluster:
    """One cluster, reached with a kubeconfig context (None: the kubeconfig's current one)."""

    def __init__(self, context: str | None = None, kubeconfig: Path | None = None,
                 timeout_s: float = 15.0):
        from kubernetes import client, config

        path = kubeconfig_path(kubeconfig)
        try:
            contexts, current = config.list_kube_config_contexts(path)
        except Exception as e:  # noqa: BLE001 (ConfigException, YAML and key errors alike)
            raise ConfigError(f"cannot read the kubeconfig {path}: {_one_line(e)}") from e
        known = [c["name"] for c in contexts or []]
        if context is not None and context not in known:
            raise ConfigError(f"kube context {context!r} is not in {path} "
                              f"(it has: {', '.join(known) or 'none'})")
        if context is None and not current:
            raise ConfigError(f"{path} has no current context: pass --context")
        self.context = context or current["name"]
        configuration = client.Configuration()
        configuration.retries = 1  # fail fast on an unreachable cluster; the user reruns
        try:
            self.api = config.new_client_from_config(config_file=path, context=self.context,
                                                     persist_config=False,
                                                     client_configuration=configuration)
        except Exception as e:  # noqa: BLE001 (a context whose cluster or user is broken)
            raise ConfigError(f"kube context {self.context!r} in {path} is unusable: "
                              f"{_one_line(e)}") from e
        self.host = self.api.configuration.host
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_version(self) -> str:
        """The API server's version; the cheap call that proves the cluster answers."""
        from kubernetes import client

        with self._errors("ask the API server for its version"):
            return client.VersionApi(self.api).get_code(_request_timeout=self.timeout_s).git_version

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        """The object as stored (a dict), or None if there is none."""
        fn, namespaced = self._method("read", api_version, kind)
        args = (name, namespace) if namespaced else (name,)
        with self._errors(f"read {kind} {name}", missing_ok=True):
            resp = fn(*args, _preload_content=False, _request_timeout=self.timeout_s)
            return json.loads(resp.data)
        return None

    def apply(self, obj: dict) -> dict:
        """Server-side apply `obj` (created if absent); returns the object as stored."""
        meta = obj["metadata"]
        fn, namespaced = self._method("patch", obj["apiVersion"], obj["kind"])
        args = (meta["name"], meta["namespace"]) if namespaced else (meta["name"],)
        with self._errors(f"apply {obj['kind']} {meta['name']}"):
            resp = fn(*args, obj, field_manager=FIELD_MANAGER, force=True,
                      _content_type=APPLY_CONTENT_TYPE, _preload_content=False,
                      _request_timeout=self.timeout_s)
            return json.loads(resp.data)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete a namespaced object; False if there was none."""
        fn, _ = self._method("delete", api_version, kind)
        with self._errors(f"delete {kind} {name}", missing_ok=True):
            fn(name, namespace, _preload_content=False, _request_timeout=self.timeout_s)
            return True
        return False

    def get_secret(self, namespace: str, name: str) -> StoredSecret | None:
        """A Secret's decoded data, labels and resourceVersion, or None if there is none."""
        obj = self.get("v1", "Secret", namespace, name)
        if obj is None:
            return None
        meta = obj.get("metadata", {})
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        return StoredSecret(data, dict(meta.get("labels") or {}), meta.get("resourceVersion"))

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's decoded data, or None if there is none."""
        secret = self.get_secret(namespace, name)
        return None if secret is None else secret.data

    def write_secret(self, namespace: str, name: str, data: dict[str, bytes],
                     labels: dict[str, str] | None = None, type: str = "Opaque",
                     resource_version: str | None = None) -> str | None:
        """Apply a Secret holding exactly `data`; returns its new resourceVersion.

        resource_version: the one `get_secret` returned; the write then fails (TemporaryError)
        if someone changed the Secret in between, instead of overwriting their change.
        """
        self.apply(secret_manifest(namespace, name, data, labels, type, resource_version))
        stored = self.get_secret(namespace, name)
        return stored.resource_version if stored else None

    def proxy_get(self, namespace: str, service: str, port: int | str, path: str) -> bytes:
        """GET `path` from a Service's port through the API server's service proxy; the body.

        What `kubectl get --raw /api/v1/namespaces/NS/services/NAME:PORT/proxy/PATH` does: the
        API server forwards the request to a ready pod behind the Service, so the kubeconfig is
        all it takes (no port-forward, no route into the cluster); the kubeconfig's user needs
        `get` on `services/proxy` in the namespace. A Service that is not there is a ConfigError;
        one with no ready pod, or a pod answering 5xx, a TransportError (it may answer later).
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        where = f"Service {service}:{port} in namespace {namespace}"
        with self._errors(f"GET /{path} from {where}"):
            try:
                resp = client.CoreV1Api(self.api).connect_get_namespaced_service_proxy_with_path(
                    f"{service}:{port}", namespace, path, _preload_content=False,
                    _request_timeout=self.timeout_s)
            except ApiException as e:
                raise _proxy_error(e, where, path, self) from e
            return resp.data

    def _method(self, verb: str, api_version: str, kind: str):
        from kubernetes import client

        try:
            api_class, suffix, namespaced = _KINDS[(api_version, kind)]
        except KeyError:
            raise ConfigError(f"fsl-edge does not manage {api_version} {kind} objects") from None
        return getattr(getattr(client, api_class)(self.api), f"{verb}_{suffix}"), namespaced

    @contextlib.contextmanager
    def _errors(self, doing: str, missing_ok: bool = False) -> Iterator[None]:
        """Turn the client's exceptions into one-line fsl-edge errors (404 is None if missing_ok)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return
            raise _api_error(e, doing, self) from e
        except HTTPError as e:
            raise TransportError(f"cannot reach the Kubernetes API at {self.host} "
                                 f"(context {self.context}): {_one_line(e)}") from e


def secret_manifest(namespace: str, name: str, data: dict[str, bytes],
                    labels: dict[str, str] | None = None, type: str = "Opaque",
                    resource_version: str | None = None) -> dict:
    """A Secret object with `data` base64-encoded, as the API takes it."""
    meta: dict = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version  # a precondition of the apply
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": type,
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def _api_error(e, doing: str, cluster: Cluster) -> FslError:
    try:
        message = json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        message = e.reason
    line = f"cannot {doing} in context {cluster.context}: {e.status} {_one_line(message)}"
    if e.status == 409:
        return TemporaryError(f"{line} (changed by someone else meanwhile: run it again)")
    if e.status in (401, 403):
        return ConfigError(f"{line} (check the kubeconfig user's rights)")
    if e.status is not None and e.status >= 500:
        return TransportError(line)
    return ConfigError(line)


def _proxy_error(e, where: str, path: str, cluster: Cluster) -> FslError:
    """A failed proxy GET: the API server's own refusal, or what the pod behind the Service said."""
    if not e.status:  # no HTTP answer at all (a TLS failure): as for every other call
        return _api_error(e, f"GET /{path} from {where}", cluster)
    try:
        answer = json.loads(e.body)
    except (TypeError, ValueError):
        answer = None
    if not (isinstance(answer, dict) and answer.get("kind") == "Status"):
        # Not a Status from the API server: the proxy passed on the pod's own answer.
        detail = _one_line(e.body or "")[:200] or e.reason
        if e.status is not None and e.status >= 500:
            return TransportError(f"{where} answered HTTP {e.status} for /{path}: {detail}")
        return ProtocolError(f"{where} answered HTTP {e.status} {e.reason} for /{path}: {detail}")
    message = _one_line(answer.get("message") or e.reason)
    if e.status == 404:
        return ConfigError(f"there is no {where} in context {cluster.context} ({message}): is it "
                           "deployed there? (--namespace, --context)")
    if e.status == 503:
        # No ready pod behind the Service yet (starting, restarting), or it refused the connection.
        return TransportError(f"{where} in context {cluster.context} is not ready: {message}")
    return _api_error(e, f"GET /{path} from {where}", cluster)


def _one_line(e: object) -> str:
    return " ".join(str(e).split())

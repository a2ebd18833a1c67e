"""A Kubernetes API emulator over real HTTP: kmock's, extended where kmock 0.8 falls short.

kmock (PyPI) serves the API's URL scheme, discovery, GET/LIST/WATCH and a naive create, merge
and delete of namespaced objects. The product talks to it with the real `kubernetes` client and
a real kubeconfig, as it would to a cluster. What kmock 0.8 lacks, `KubeApi` below adds, each
served the way the Kubernetes API documents it:

- `/version/`: kmock serves `/version` only; the API server (and the client) use both.
- Cluster-scoped objects (Namespaces): kmock parses `/api/v1/namespaces/NAME` as a namespace
  prefix and fails on create. Served here: create, get, list, apply, replace, delete.
- Server-side apply (PATCH, application/apply-patch+yaml): kmock merges into an existing object
  and answers 404 for a new one. Here an apply creates the object if absent (201), otherwise
  the applied configuration becomes the object (the fields its one field manager omits are
  removed: exact for a single manager, which is all fsl-edge uses), keeping the fields the
  server and controllers own (metadata.uid, creationTimestamp, generation, `status`, a
  Service's clusterIP and nodePorts). A metadata.resourceVersion in the applied configuration
  is a precondition: a different one answers 409 Conflict.
- PUT (replace): absent from kmock; here it replaces an existing object (404 if none, 409 on a
  stale resourceVersion).
- Server-set metadata: resourceVersion, uid, creationTimestamp, generation (bumped when the
  spec changes). A write that changes nothing is not persisted, so the resourceVersion stays:
  the API server's documented behaviour for a no-op apply, and what proves a re-deploy idle.
- Stand-ins for what controllers do in a cluster (the API server itself does not): with
  `controllers=True`, a Deployment or StatefulSet reports every replica updated and ready as
  soon as it is written, and a LoadBalancer Service gets `lb_address` as its ingress address.
  Set `controllers=False` to see a rollout that never finishes.
- The API server's service proxy, absent from kmock (what `kubectl get --raw` and the client's
  `connect_get_namespaced_service_proxy_with_path` use):
  `GET /api/v1/namespaces/NS/services/[SCHEME:]NAME[:PORT]/proxy/PATH`. A Service that is not
  stored answers 404 NotFound. For one that is, with PORT (a port's name or number; none if it
  has a single port) among its ports, the GET goes to the URL the test put in
  `endpoints[(namespace, name, port number)]`, a real HTTP server standing in for the ready pod
  behind that port, and its status, Content-Type and body come back unchanged, as the API
  server passes them on. With no such entry (no ready pod), or a URL that refuses the
  connection, it answers 503 ServiceUnavailable in the API server's words.
  GET only: it is all fsl-edge sends.

Not emulated: validation, defaulting beyond the above, field ownership between several
managers, admission, RBAC, watches of the objects served here. The product is never shaped to
this emulator: where the two disagree, the emulator is what gets fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import itertools
import json
import os
import re
import threading
import uuid
from pathlib import Path

import aiohttp.web
import kmock
import pytest
import yaml

NAMESPACES = kmock.resource(group="", version="v1", plural="namespaces")
_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/(?P<name>[^/]+))?/?$")
_WORKLOADS = {"deployments", "statefulsets"}
_PROXY_PATH = re.compile(r"^/api/v1/namespaces/(?P<namespace>[^/]+)/services/(?P<target>[^/]+)"
                         r"/proxy(?:/(?P<path>.*))?$")


class KubeApi(kmock.KubernetesEmulator):
    """kmock's emulator with cluster-scoped objects, server-side apply, PUT and resourceVersions."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /version/"] << self._serve_server_version  # the client's spelling
        self.controllers = True
        self.lb_address = "203.0.113.7"  # TEST-NET-3: documentation only, never routed
        self._versions = itertools.count(1)
        self._node_ports = itertools.count(30100)
        # (namespace, Service, port number) -> base URL of the ready pod behind it, for the proxy
        self.endpoints: dict[tuple[str, str, int], str] = {}

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path  # percent-decoded: the client sends NAME%3APORT
        proxy = _PROXY_PATH.match(path)
        if proxy and request.method == kmock.method.GET:
            return await self._proxy(request, **proxy.groupdict())
        ns_match = _NAMESPACE_PATH.match(path) if request.subresource is None else None
        if ns_match and request.method != kmock.method.GET or (ns_match and ns_match["name"]):
            key = (NAMESPACES, None, ns_match["name"])
            return await self._serve(request, key, collection=ns_match["name"] is None)
        if ns_match:  # GET /api/v1/namespaces: the list
            async with self._lock:
                items = [o.raw for k, o in self._objects.items() if k[0] == NAMESPACES and not o.deleted]
            return _json({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items})
        writes = (kmock.method.POST, kmock.method.PUT, kmock.method.PATCH)
        if (request.resource is not None and request.subresource is None and request.method in writes
                and (request.method != kmock.method.PATCH or _is_apply(request))):
            key = (request.resource, request.namespace, request.name)
            return await self._serve(request, key, collection=request.name is None)
        return await super()._handle(request)

    async def _serve(self, request: kmock.Request, key, collection: bool) -> aiohttp.web.StreamResponse:
        body = _body(request)
        method = request.method
        if collection and method == kmock.method.POST:
            key = (key[0], key[1], (body.get("metadata") or {}).get("name"))
        resource, namespace, name = key
        async with self._lock:
            current = self._objects[key].raw if key in self._objects and not self._objects[key].deleted else None
            if method == kmock.method.GET:
                return _json(current) if current else _status(404, "NotFound", f"{resource.plural} {name!r} not found")
            if method == kmock.method.DELETE:
                if current is None:
                    return _status(404, "NotFound", f"{resource.plural} {name!r} not found")
                self._objects[key].delete()
                return _json(current)
            if method == kmock.method.POST and current is not None:
                return _status(409, "AlreadyExists", f"{resource.plural} {name!r} already exists")
            if method == kmock.method.PUT and current is None:
                return _status(404, "NotFound", f"{resource.plural} {name!r} not found")
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if current is not None and wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", f"Operation cannot be fulfilled on {resource.plural} "
                                                f"{name!r}: the object has been modified; please apply "
                                                "your changes to the latest version and try again")
            new = self._merge(resource, namespace, body, current)
            if new == current:
                return _json(current)  # nothing changed: not persisted, same resourceVersion
            new["metadata"]["resourceVersion"] = str(next(self._versions))
            if current is None:
                self._objects[key] = new
            else:
                self._objects[key].history.append(new)
            await self._buses[resource].put({"type": "MODIFIED" if current else "ADDED", "object": new})
        return _json(new, 200 if current else 201)

    async def _proxy(self, request: kmock.Request, namespace: str, target: str,
                     path: str | None) -> aiohttp.web.StreamResponse:
        """The service proxy: find the Service and its port, forward to the pod, pass on its answer."""
        parts = target.split(":")  # [SCHEME:]NAME[:PORT], split as the API server splits it
        name, port = (parts + [""])[:2] if len(parts) < 3 else parts[1:]
        async with self._lock:
            service = next((o.raw for k, o in self._objects.items() if not o.deleted
                            and (k[0].plural, k[1], k[2]) == ("services", namespace, name)), None)
        if service is None:
            return _status(404, "NotFound", f'services "{name}" not found')
        ports = service.get("spec", {}).get("ports", [])
        if port:  # a port's name or number; without one, the Service must have a single port
            ports = [p for p in ports if port in (p.get("name"), str(p.get("port")))]
        url = self.endpoints.get((namespace, name, ports[0]["port"])) if len(ports) == 1 else None
        if url is None:
            return _status(503, "ServiceUnavailable",
                           f'no endpoints available for service "{name}"')
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"{url.rstrip('/')}/{path or ''}", params=request.url.query,
                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                body = await resp.read()
                content_type = resp.headers.get("Content-Type", "application/octet-stream")
                return aiohttp.web.Response(status=resp.status, body=body,
                                            headers={"Content-Type": content_type})
        except (aiohttp.ClientError, TimeoutError) as e:
            return _status(503, "ServiceUnavailable", f"error trying to reach service: {e}")

    def _merge(self, resource, namespace: str | None, body: dict, current: dict | None) -> dict:
        """The object after a write of `body`: server-owned fields kept, controllers' work done."""
        new = copy.deepcopy(body)
        meta = new.setdefault("metadata", {})
        meta.pop("resourceVersion", None)
        if namespace is not None:
            meta["namespace"] = namespace
        old_meta = (current or {}).get("metadata", {})
        meta["uid"] = old_meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or (
            dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["resourceVersion"] = old_meta.get("resourceVersion")
        if resource.plural == "services":
            self._allocate(new, current)
        generation = old_meta.get("generation", 0)
        meta["generation"] = generation if current and current.get("spec") == new.get("spec") else generation + 1
        if current and "status" in current:
            new["status"] = copy.deepcopy(current["status"])
        if self.controllers:
            self._reconcile(resource, new)
        return new

    def _allocate(self, service: dict, current: dict | None) -> None:
        spec = service.setdefault("spec", {})
        old_spec = (current or {}).get("spec", {})
        spec.setdefault("clusterIP", old_spec.get("clusterIP") or "10.96.0.10")
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            old_ports = {p.get("name"): p.get("nodePort") for p in old_spec.get("ports", [])}
            for port in spec.get("ports", []):
                port.setdefault("nodePort", old_ports.get(port.get("name")) or next(self._node_ports))

    def _reconcile(self, resource, obj: dict) -> None:
        if resource.plural in _WORKLOADS:
            n = obj.get("spec", {}).get("replicas", 1)
            revision = f"{obj['metadata']['name']}-{obj['metadata']['generation']}"
            status = {"observedGeneration": obj["metadata"]["generation"], "replicas": n,
                      "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}
            if resource.plural == "statefulsets":
                status |= {"currentRevision": revision, "updateRevision": revision}
            obj["status"] = status
        elif resource.plural == "services" and obj.get("spec", {}).get("type") == "LoadBalancer":
            obj["status"] = {"loadBalancer": {"ingress": [{"ip": self.lb_address}]}}


def _is_apply(request: kmock.Request) -> bool:
    return request.headers.get("Content-Type", "").startswith("application/apply-patch")


def _body(request: kmock.Request) -> dict:
    if isinstance(request.data, dict):
        return request.data
    if request.text:  # YAML, for clients that send it as such
        return yaml.safe_load(request.text) or {}
    return {}


def _json(obj: dict, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(obj, status=status)


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return _json({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                  "code": code, "reason": reason, "message": message}, code)


class EmulatedCluster:
    """`KubeApi` on a free loopback port, served from a thread of its own for synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kube-emulator", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self.api: KubeApi | None = None
        self.url = ""

    def start(self) -> EmulatedCluster:
        self.thread.start()
        self.url = str(self._run(self._enter()))
        return self

    async def _enter(self):
        self.api = await self._stack.enter_async_context(KubeApi())
        server = await self._stack.enter_async_context(kmock.Server(self.api))
        return server.url

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def objects(self) -> dict[tuple[str, str | None, str], dict]:
        """A copy of every stored object, keyed by (plural, namespace, name)."""
        async def snapshot():
            async with self.api._lock:
                return {(k[0].plural, k[1], k[2]): copy.deepcopy(o.raw)
                        for k, o in self.api._objects.items() if not o.deleted}
        return self._run(snapshot())

    def request_count(self, method: str | None = None) -> int:
        """Requests served so far (of one HTTP method, if given)."""
        return sum(1 for r in self.api._requests if method is None or r.method == method.upper())

    def write_kubeconfig(self, path: Path, context: str = "emulated") -> Path:
        """A kubeconfig whose `context` points at this emulator (and is the current one)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "emulator", "cluster": {"server": self.url.rstrip("/")}}],
            "users": [{"name": "tester", "user": {"token": "emulated"}}],
            "contexts": [{"name": context, "context": {"cluster": "emulator", "user": "tester"}}],
        }
        path.write_text(json.dumps(config))
        return path


@contextlib.contextmanager
def emulated_cluster(folder: Path):
    """A fresh emulated cluster; its kubeconfig is `folder / "kubeconfig"` (context "emulated")."""
    cluster = EmulatedCluster().start()
    cluster.kubeconfig = cluster.write_kubeconfig(folder / "kubeconfig")
    try:
        yield cluster
    finally:
        cluster.stop()


def isolate_from_machine(tmp_path: Path, monkeypatch) -> None:
    """No FSL_ variables, KUBECONFIG or ~/.kube/config of the machine leak into a test."""
    for var in list(os.environ):
        if var.startswith("FSL_") or var == "KUBECONFIG":
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture
def kube(tmp_path: Path):
    """`emulated_cluster` as a fixture (a conftest.py may import it to share it)."""
    with emulated_cluster(tmp_path) as cluster:
        yield cluster

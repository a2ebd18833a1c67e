"""Where node identities live: a local folder, or Kubernetes Secrets the broker mounts.

Both backends hold the same four documents (`Registry`): Mosquitto's password file and ACL file
as text, the node list, and the per-node message keys. `load()` reads them all; `save(old, new)`
writes the ones that changed in a fixed order (keys, ACL, password file, node list) and puts
back what it already wrote when a later write fails, so a failed enroll or revoke leaves the
store as it was.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from fsl_edge.atomic import write_atomic
from fsl_edge.deploy.names import (ACL_KEY, BROKER_AUTH_SECRET, BROKER_CA_SECRET, BROKER_TLS_SECRET,
                                   COORDINATOR_CLIENT_TLS_SECRET, LABELS, NODE_KEYS_SECRET,
                                   PASSWD_KEY)
from fsl_edge.errors import ConfigError

# Kubernetes Secrets, named where deploy and k8s/ name them: the broker mounts BROKER_AUTH_SECRET
# (its reloader sidecar SIGHUPs mosquitto on a change) and the coordinator NODE_KEYS_SECRET (one
# key per node name: its message key as base64 text).
NODES_SECRET = "fsl-nodes"
"""Opaque: one key per node name, its NodeRecord as JSON; read by enroll, revoke and nodes only."""
CA_KEY = "ca.crt"  # in BROKER_TLS_SECRET: the CA sites trust
# Local folder files
PASSWD, ACL, NODES_JSON, KEYS_JSON = "passwd", "acl", "nodes.json", "node-keys.json"


class NodeRecord(BaseModel):
    """One enrolled node, kept after revocation so the name is never handed out again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enrolled_at: datetime
    state: Literal["enrolled", "revoked"] = "enrolled"
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Registry:
    passwd: str = ""
    """Mosquitto password file: `user:$7$...` lines."""
    acl: str = ""
    """Mosquitto ACL file."""
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    """Node name -> its message-authentication key (32 random bytes, base64)."""


class SecretClient(Protocol):
    """The two calls the Kubernetes backend needs (fsl_edge.deploy.kube.Cluster provides them)."""

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's data, decoded; None when it does not exist."""

    def write_secret(self, namespace: str, name: str, data: dict[str, bytes], labels: dict[str, str]) -> None:
        """Create the Secret or replace its data (the whole of it) and labels."""


class NodeStore(ABC):
    """The registry of node identities behind one of the backends."""

    where: str
    """Names the store in messages: a folder, or a namespace in a kubeconfig context."""

    @abstractmethod
    def load(self) -> Registry: ...

    def save(self, old: Registry, new: Registry) -> None:
        """Write what differs between old and new; on failure restore what was written."""
        # The ACL before the password file: a revoked node loses its topics before its login, and
        # a new one can log in only once its topics exist. The node list, the record that an
        # identity exists, goes last: once the broker knows it (enroll) or has forgotten it.
        parts = [p for p in self._parts() if p[0](old) != p[0](new)]
        done: list[Callable[[Registry], None]] = []
        try:
            for _, write in parts:
                write(new)
                done.append(write)
        except BaseException:
            for write in reversed(done):
                with suppress(Exception):
                    write(old)
            raise

    @abstractmethod
    def _parts(self) -> list[tuple[Callable[[Registry], object], Callable[[Registry], None]]]:
        """(what part of a registry, how to write it), in the order save writes them."""


class LocalStore(NodeStore):
    """A folder for a federation without a cluster: passwd, acl, nodes.json, node-keys.json.

    Every file is written atomically and readable by its owner only (mode 0600); run the broker
    as the same user (mosquitto started as root drops to the `mosquitto` user unless its config
    says `user root`).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.where = f"the folder {self.folder}"

    def load(self) -> Registry:
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"{self.folder} is not a folder: --local needs a folder for the node store")
        nodes = _json(self._read(NODES_JSON), self.folder / NODES_JSON)
        keys = _json(self._read(KEYS_JSON), self.folder / KEYS_JSON)
        return Registry(self._read(PASSWD), self._read(ACL), _records(nodes, self.folder / NODES_JSON),
                        {str(k): str(v) for k, v in keys.items()})

    def _read(self, name: str) -> str:
        try:
            return (self.folder / name).read_text()
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise ConfigError(f"cannot read {self.folder / name}: {e.strerror}") from e

    def _write(self, name: str, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.folder / name, text)  # mkstemp makes the file 0600; rename keeps it

    def _parts(self):
        return [
            (lambda r: r.keys, lambda r: self._write(KEYS_JSON, _dump(r.keys))),
            (lambda r: r.acl, lambda r: self._write(ACL, r.acl)),
            (lambda r: r.passwd, lambda r: self._write(PASSWD, r.passwd)),
            (lambda r: r.nodes, lambda r: self._write(NODES_JSON, _dump_nodes(r.nodes))),
        ]


class KubeStore(NodeStore):
    """Secrets in one namespace: fsl-broker-auth (passwd, acl), fsl-node-keys, fsl-nodes.

    fsl-broker-auth must exist (deploy creates it with the coordinator's own user); enrollment
    adds and removes node entries in it and leaves every other line as it is.
    """

    def __init__(self, client: SecretClient, namespace: str, context: str | None = None):
        self.client, self.namespace = client, namespace
        self.where = f"namespace {namespace}" + (f" of context {context}" if context else "")

    def load(self) -> Registry:
        auth = self.client.read_secret(self.namespace, BROKER_AUTH_SECRET)
        if auth is None:
            raise ConfigError(f"no Secret {BROKER_AUTH_SECRET} in {self.where}: deploy the "
                              "coordinator and broker there first (fsl-edge deploy)")
        keys = self.client.read_secret(self.namespace, NODE_KEYS_SECRET) or {}
        nodes = self.client.read_secret(self.namespace, NODES_SECRET) or {}
        where = f"Secret {NODES_SECRET} in {self.where}"
        return Registry(
            _text(auth.get(PASSWD_KEY, b""), BROKER_AUTH_SECRET), _text(auth.get(ACL_KEY, b""), BROKER_AUTH_SECRET),
            _records({k: _json(_text(v, NODES_SECRET), where) for k, v in nodes.items()}, where),
            {k: _text(v, NODE_KEYS_SECRET) for k, v in keys.items()})

    def broker_ca(self) -> bytes | None:
        """The CA that signed the broker's certificate, as deploy stored it; None if absent."""
        return (self.client.read_secret(self.namespace, BROKER_TLS_SECRET) or {}).get(CA_KEY)

    def broker_ca_pair(self) -> tuple[bytes, bytes] | None:
        """The broker CA's certificate and private key (to issue client certificates); None if
        deploy did not make the CA (the user brought the broker's certificate)."""
        data = self.client.read_secret(self.namespace, BROKER_CA_SECRET) or {}
        return (data["tls.crt"], data["tls.key"]) if {"tls.crt", "tls.key"} <= data.keys() else None

    def mutual_tls(self) -> bool:
        """Whether the deployment demands client certificates (deploy then issued the
        coordinator's)."""
        return self.client.read_secret(self.namespace, COORDINATOR_CLIENT_TLS_SECRET) is not None

    def _parts(self):
        return [
            (lambda r: r.keys, lambda r: self._put(NODE_KEYS_SECRET, "node-keys",
                                                   {k: v.encode() for k, v in r.keys.items()})),
            (lambda r: (r.passwd, r.acl), lambda r: self._put(BROKER_AUTH_SECRET, "broker-auth", {
                PASSWD_KEY: r.passwd.encode(), ACL_KEY: r.acl.encode()})),
            (lambda r: r.nodes, lambda r: self._put(NODES_SECRET, "nodes", {
                k: v.model_dump_json().encode() for k, v in r.nodes.items()})),
        ]

    def _put(self, name: str, component: str, data: dict[str, bytes]) -> None:
        self.client.write_secret(self.namespace, name, data,
                                 {**LABELS, "app.kubernetes.io/component": component})


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _dump_nodes(nodes: dict[str, NodeRecord]) -> str:
    return _dump({k: v.model_dump(mode="json") for k, v in nodes.items()})


def _json(text: str, where: object) -> dict:
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}); restore it from a backup") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object, not {type(data).__name__}")
    return data


def _records(data: dict, where: object) -> dict[str, NodeRecord]:
    try:
        return {str(k): NodeRecord.model_validate(v) for k, v in data.items()}
    except ValidationError as e:
        raise ConfigError(f"{where} holds an invalid node record: {e.errors()[0]['msg']}") from e


def _text(value: bytes, secret: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"Secret {secret} holds a value that is not UTF-8 text") from e

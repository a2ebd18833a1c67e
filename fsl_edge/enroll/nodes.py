"""Enroll, revoke and list node identities in a NodeStore.

An identity is a broker user named after the node with a random password, ACL entries for the
node's own topics and the broadcast, and a random key for message authentication. The store
keeps only the password's hash: the password itself goes into the site's bundle and nowhere else.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from fsl_edge.errors import ConfigError

from . import mosquitto
from .store import NodeRecord, NodeStore, Registry

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
PASSWORD_BYTES = 32
NODE_KEY_BYTES = 32
ONLINE_STATES = ("online", "training")  # fsl_edge.status.AgentStatus.state values of a live agent


@dataclass(frozen=True)
class Identity:
    """What a site needs to join: give it to that site only."""

    name: str
    password: str
    node_key: str
    """32 random bytes, base64: the key the node signs its messages with."""
    enrolled_at: datetime


@dataclass(frozen=True)
class NodeInfo:
    name: str
    enrolled_at: datetime
    state: str
    """enrolled, online (enrolled and seen by the coordinator) or revoked."""
    revoked_at: datetime | None = None


def check_name(name: str) -> str:
    """Return name if it can be a node name (a lowercase DNS label), else raise ConfigError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"node name {name!r} is invalid: use 1-63 lowercase letters, digits and "
                          "'-', starting and ending with a letter or digit (like a DNS label)")
    return name


def plan_enroll(registry: Registry, name: str, now: datetime | None = None) -> tuple[Registry, Identity]:
    """The registry with `name` enrolled, and its new identity; ConfigError if the name is taken."""
    check_name(name)
    record = registry.nodes.get(name)
    if record is not None and record.state == "revoked":
        raise ConfigError(f"node {name!r} was revoked on {_day(record.revoked_at)}; a revoked name "
                          "is not reused: enroll the site under a new name")
    if record is not None:
        raise ConfigError(f"node {name!r} is already enrolled (since {_day(record.enrolled_at)}): "
                          "pick another name")
    for where, taken in (("password file", mosquitto.passwd_users(registry.passwd)),
                         ("ACL file", mosquitto.acl_users(registry.acl)), ("node keys", registry.keys)):
        if name in taken:
            raise ConfigError(f"{name!r} is already a user in the broker's {where} but was not "
                              "enrolled by fsl-edge (the coordinator's own user?): pick another name")
    now = now or datetime.now(timezone.utc)
    identity = Identity(name, secrets.token_urlsafe(PASSWORD_BYTES),
                        base64.b64encode(secrets.token_bytes(NODE_KEY_BYTES)).decode(), now)
    return replace(
        registry,
        passwd=mosquitto.passwd_add(registry.passwd, name, identity.password),
        acl=mosquitto.acl_add(registry.acl, name, f"enrolled {now.isoformat(timespec='seconds')}"),
        keys={**registry.keys, name: identity.node_key},
        nodes={**registry.nodes, name: NodeRecord(enrolled_at=now)},
    ), identity


def plan_revoke(registry: Registry, name: str, now: datetime | None = None) -> Registry:
    """The registry with `name`'s password, ACL and key removed and its record marked revoked."""
    record = registry.nodes.get(name)
    if record is None:
        raise ConfigError(f"no node named {name!r} is enrolled (`fsl-edge nodes` lists them)")
    if record.state == "revoked":
        raise ConfigError(f"node {name!r} was already revoked on {_day(record.revoked_at)}")
    now = now or datetime.now(timezone.utc)
    return replace(
        registry,
        passwd=mosquitto.passwd_remove(registry.passwd, name),
        acl=mosquitto.acl_remove(registry.acl, name),
        keys={k: v for k, v in registry.keys.items() if k != name},
        nodes={**registry.nodes, name: record.model_copy(update={"state": "revoked", "revoked_at": now})},
    )


def enroll(store: NodeStore, name: str) -> Identity:
    """Create `name`'s identity in the store (the broker picks it up when it reloads)."""
    old = store.load()
    new, identity = plan_enroll(old, name)
    store.save(old, new)
    return identity


def revoke(store: NodeStore, name: str) -> None:
    """Remove `name`'s credentials; once the broker reloads, its next connection is refused."""
    old = store.load()
    store.save(old, plan_revoke(old, name))


def list_nodes(store: NodeStore, agent_states: Mapping[str, str] | None = None) -> list[NodeInfo]:
    """Every node ever enrolled, by name; `agent_states` (the coordinator's view, agent -> state)
    marks enrolled nodes that are connected as online."""
    out = []
    for name, record in sorted(store.load().nodes.items()):
        state = record.state
        if state == "enrolled" and agent_states and agent_states.get(name) in ONLINE_STATES:
            state = "online"
        out.append(NodeInfo(name, record.enrolled_at, state, record.revoked_at))
    return out


def _day(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else "an unknown date"

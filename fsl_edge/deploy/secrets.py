"""The Secrets deploy owns, planned from what the cluster holds: create what is missing, keep the rest.

- fsl-broker-ca: the CA, made once and never regenerated (every site trusts it).
- fsl-broker-tls: the broker's certificate from that CA; re-issued only when the names sites use
  change or it nears expiry. One the user brought (no fsl-edge labels) is never touched.
- fsl-coordinator-mqtt: the coordinator's broker username and password, made once.
- fsl-coordinator-client-tls: with mutual TLS only, the coordinator's client certificate from
  the CA; re-issued when it nears expiry or the CA is another.
- fsl-coordinator-signing: the coordinator's Ed25519 message-signing key, made once and never
  regenerated (every site's bundle holds its public half).
- fsl-broker-auth: the coordinator's entries are added to the password file and ACL (or
  repaired); every other entry, each site's, is left as `fsl-edge enroll` wrote it.

Planning reads only, so every Secret is decided before the first write.
"""

from __future__ import annotations

import secrets as random_secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from fsl_edge import auth
from fsl_edge.errors import ConfigError

from . import broker_auth, names, pki
from .kube import StoredSecret, secret_manifest

TLS_TYPE = "kubernetes.io/tls"


@dataclass
class SecretPlan:
    """Secret objects to apply, in order, and one line per decision for the user."""

    writes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ca: pki.KeyPair | None = None
    """The broker CA, when fsl-edge manages the broker's certificate."""


def managed(secret: StoredSecret | None) -> bool:
    return secret is not None and all(secret.labels.get(k) == v for k, v in names.LABELS.items())


def plan_secrets(read: Callable[[str], StoredSecret | None], namespace: str,
                 broker_names: list[str], client_certificates: bool = False) -> SecretPlan:
    """Decide every Secret write; `read(name)` gives a Secret of the namespace or None.
    `client_certificates`: mutual TLS, so the coordinator needs a client certificate too."""
    plan = SecretPlan()
    _plan_tls(plan, read, namespace, broker_names)
    if client_certificates:
        _plan_client_tls(plan, read, namespace)
    password = _plan_coordinator(plan, read, namespace)
    _plan_auth(plan, read, namespace, password)
    _plan_signing(plan, read, namespace)
    return plan


def server_certificate(plan_ca: pki.KeyPair, namespace: str, broker_names: list[str]) -> dict:
    """Secret fsl-broker-tls with a fresh certificate for `broker_names` from the CA."""
    server = pki.issue_server(plan_ca, broker_names)
    return secret_manifest(namespace, names.BROKER_TLS_SECRET,
                           {"ca.crt": plan_ca.cert, "tls.crt": server.cert, "tls.key": server.key},
                           names.LABELS, TLS_TYPE)


def _plan_tls(plan: SecretPlan, read, namespace: str, broker_names: list[str]) -> None:
    tls = read(names.BROKER_TLS_SECRET)
    if tls is not None and not managed(tls):
        plan.notes.append(f"Secret {names.BROKER_TLS_SECRET} was not made by fsl-edge: kept as is")
        if "ca.crt" not in tls.data:
            plan.notes.append(f"warning: {names.BROKER_TLS_SECRET} has no ca.crt, which site "
                              "bundles need")
        return
    stored_ca = read(names.BROKER_CA_SECRET)
    if stored_ca is not None:
        if not {"tls.crt", "tls.key"} <= stored_ca.data.keys():
            raise ConfigError(f"Secret {names.BROKER_CA_SECRET} lacks tls.crt or tls.key: restore "
                              "it from a backup (a new CA means enrolling every site again)")
        plan.ca = pki.KeyPair(stored_ca.data["tls.crt"], stored_ca.data["tls.key"])
    else:
        if tls is not None:
            # A lost CA cannot sign for the certificate sites already trust: say so.
            plan.notes.append(f"warning: Secret {names.BROKER_CA_SECRET} is gone: a new CA is "
                              "made and every site must be enrolled again")
        plan.ca = pki.new_ca(namespace)
        plan.writes.append(secret_manifest(namespace, names.BROKER_CA_SECRET,
                                           {"tls.crt": plan.ca.cert, "tls.key": plan.ca.key},
                                           names.LABELS, TLS_TYPE))
        plan.notes.append(f"created the broker CA (Secret {names.BROKER_CA_SECRET})")
    if tls is None:
        reason = "none yet"
    elif tls.data.get("ca.crt") != plan.ca.cert or "tls.crt" not in tls.data:
        reason = "it does not match the broker CA"
    else:
        reason = pki.needs_reissue(tls.data["tls.crt"], plan.ca.cert, broker_names)
    if reason:
        plan.writes.append(server_certificate(plan.ca, namespace, broker_names))
        plan.notes.append(f"issued the broker certificate for {', '.join(broker_names)} ({reason})")


def _plan_client_tls(plan: SecretPlan, read, namespace: str) -> None:
    if plan.ca is None:
        raise ConfigError(f"client_certificates needs the broker CA that fsl-edge manages: Secret "
                          f"{names.BROKER_TLS_SECRET} was brought without it, so nothing here can "
                          "issue client certificates (turn client_certificates off, or let deploy "
                          "make the broker's certificate)")
    stored = read(names.COORDINATOR_CLIENT_TLS_SECRET)
    if stored is None or "tls.crt" not in stored.data or "tls.key" not in stored.data:
        reason = "none yet"
    else:
        reason = pki.needs_reissue(stored.data["tls.crt"], plan.ca.cert, [])
    if reason:
        client = pki.issue_client(plan.ca, names.COORDINATOR)
        plan.writes.append(secret_manifest(namespace, names.COORDINATOR_CLIENT_TLS_SECRET,
                                           {"tls.crt": client.cert, "tls.key": client.key},
                                           names.LABELS, TLS_TYPE))
        plan.notes.append(f"issued the coordinator's client certificate for mutual TLS ({reason})")


def _plan_coordinator(plan: SecretPlan, read, namespace: str) -> str:
    stored = read(names.COORDINATOR_MQTT_SECRET)
    if stored is not None and {"username", "password"} <= stored.data.keys():
        if stored.data["username"].decode() != names.COORDINATOR:
            raise ConfigError(f"Secret {names.COORDINATOR_MQTT_SECRET} names user "
                              f"{stored.data['username'].decode()!r}, not {names.COORDINATOR!r}")
        return stored.data["password"].decode()
    password = random_secrets.token_urlsafe(32)
    plan.writes.append(secret_manifest(
        namespace, names.COORDINATOR_MQTT_SECRET,
        {"username": names.COORDINATOR.encode(), "password": password.encode()}, names.LABELS))
    plan.notes.append(f"created the coordinator's broker identity (Secret "
                      f"{names.COORDINATOR_MQTT_SECRET})")
    return password


def _plan_signing(plan: SecretPlan, read, namespace: str) -> None:
    stored = read(names.COORDINATOR_SIGNING_SECRET)
    if stored is not None:
        private = stored.data.get(names.SIGNING_PRIVATE_KEY, b"").decode(errors="replace")
        public = stored.data.get(names.SIGNING_PUBLIC_KEY, b"").decode(errors="replace")
        try:
            intact = auth.public_key_of(private) == public.strip()
        except ConfigError:
            intact = False
        if not intact:
            raise ConfigError(f"Secret {names.COORDINATOR_SIGNING_SECRET} does not hold a matching "
                              f"{names.SIGNING_PRIVATE_KEY}/{names.SIGNING_PUBLIC_KEY} key pair: "
                              "restore it from a backup (a new key means enrolling every site again)")
        return
    if read(names.NODE_KEYS_SECRET) is not None:
        plan.notes.append(f"warning: Secret {names.COORDINATOR_SIGNING_SECRET} is gone: a new "
                          "signing key is made and every site must be enrolled again")
    private = auth.new_signing_key()
    plan.writes.append(secret_manifest(namespace, names.COORDINATOR_SIGNING_SECRET, {
        names.SIGNING_PRIVATE_KEY: private.encode(),
        names.SIGNING_PUBLIC_KEY: auth.public_key_of(private).encode()}, names.LABELS))
    plan.notes.append(f"created the coordinator's message signing key (Secret "
                      f"{names.COORDINATOR_SIGNING_SECRET})")


def _plan_auth(plan: SecretPlan, read, namespace: str, password: str) -> None:
    stored = read(names.BROKER_AUTH_SECRET)
    data = dict(stored.data) if stored else {}
    passwd = data.get(names.PASSWD_KEY, b"").decode()
    acl = data.get(names.ACL_KEY, b"").decode()
    new_passwd = broker_auth.with_password(passwd, names.COORDINATOR, password)
    new_acl = broker_auth.with_acl(acl, names.COORDINATOR, list(names.COORDINATOR_ACL_TOPICS))
    if stored is not None and (new_passwd, new_acl) == (passwd, acl):
        return
    data.update({names.PASSWD_KEY: new_passwd.encode(), names.ACL_KEY: new_acl.encode()})
    # The resourceVersion makes the write fail rather than drop a site `enroll` adds meanwhile.
    plan.writes.append(secret_manifest(namespace, names.BROKER_AUTH_SECRET, data, names.LABELS,
                                       resource_version=stored.resource_version if stored else None))
    plan.notes.append(f"wrote the coordinator's broker credentials and ACL into Secret "
                      f"{names.BROKER_AUTH_SECRET}")

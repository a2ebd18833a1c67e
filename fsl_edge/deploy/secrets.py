"""The Secrets deploy owns, planned from what the cluster holds: create what is missing, keep the rest.

- fsl-broker-ca: the CA, made once and never regenerated (every site trusts it).
- fsl-broker-tls: the broker's certificate from that CA; re-issued only when the names sites use
  change or it nears expiry. One the user brought (no fsl-edge labels) is never touched.
- fsl-coordinator-mqtt: the coordinator's broker username and password, made once.
- fsl-coordinator-client-tls: with mutual TLS only, the coordinator's client certificate from
  the CA; re-issued when it nears expiry or the CA is another.
- fsl-coordinator-signing: the coordinator's Ed25519 message-signing key, made once and never
  regenerated (every site's bundle holds its public half).
- fsl-worker-mqtt and, with mutual TLS, fsl-worker-client-tls: the split-server workers' broker
  login and client certificate, all replicas sharing them, made while workers are deployed.
- fsl-broker-auth: the coordinator's entries (and while workers are deployed, the workers')
  are added to the password file and ACL (or repaired); the workers' are removed when they no
  longer are. Every other entry, each site's, is left as `fsl-edge enroll` wrote it, except
  that with workers a site enrolled before them gains the step topics it lacks.

Planning reads only, so every Secret is decided before the first write.
"""

from __future__ import annotations

import secrets as random_secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from fsl_edge import auth
from fsl_edge.errors import ConfigError

from . import broker_auth, names, pki, topics
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
                 broker_names: list[str], client_certificates: bool = False,
                 workers: bool = False) -> SecretPlan:
    """Decide every Secret write; `read(name)` gives a Secret of the namespace or None.
    `client_certificates`: mutual TLS, so the coordinator needs a client certificate too.
    `workers`: split-server workers are deployed, so they need their login (and certificate)."""
    plan = SecretPlan()
    _plan_tls(plan, read, namespace, broker_names)
    if workers:
        _check_no_site_is_named(read, names.WORKER)
    if client_certificates:
        _plan_client_tls(plan, read, namespace, names.COORDINATOR_CLIENT_TLS_SECRET,
                         names.COORDINATOR, "the coordinator's")
        if workers:
            _plan_client_tls(plan, read, namespace, names.WORKER_CLIENT_TLS_SECRET, names.WORKER,
                             "the split-server workers'")
    password = _plan_login(plan, read, namespace, names.COORDINATOR_MQTT_SECRET,
                           names.COORDINATOR, "the coordinator's")
    # the workers' shared-subscription group: Mosquitto's ACL does not check subscriptions, so
    # a name only the workers know is what keeps a site from joining the group (and being dealt
    # steps it may not read, which would be lost)
    worker_password = _plan_login(plan, read, namespace, names.WORKER_MQTT_SECRET, names.WORKER,
                                  "the split-server workers'", extra=(SHARE_GROUP_KEY,)) \
        if workers else None
    _plan_auth(plan, read, namespace, password, worker_password)
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


def _plan_client_tls(plan: SecretPlan, read, namespace: str, secret: str, user: str,
                     whose: str) -> None:
    if plan.ca is None:
        raise ConfigError(f"client_certificates needs the broker CA that fsl-edge manages: Secret "
                          f"{names.BROKER_TLS_SECRET} was brought without it, so nothing here can "
                          "issue client certificates (turn client_certificates off, or let deploy "
                          "make the broker's certificate)")
    stored = read(secret)
    if stored is None or "tls.crt" not in stored.data or "tls.key" not in stored.data:
        reason = "none yet"
    else:
        reason = pki.needs_reissue(stored.data["tls.crt"], plan.ca.cert, [])
    if reason:
        client = pki.issue_client(plan.ca, user)
        plan.writes.append(secret_manifest(namespace, secret,
                                           {"tls.crt": client.cert, "tls.key": client.key},
                                           names.LABELS, TLS_TYPE))
        plan.notes.append(f"issued {whose} client certificate for mutual TLS ({reason})")


SHARE_GROUP_KEY = "share_group"  # in Secret fsl-worker-mqtt; the worker reads it as FSL_SHARE_GROUP


def _plan_login(plan: SecretPlan, read, namespace: str, secret: str, user: str, whose: str,
                extra: tuple[str, ...] = ()) -> str:
    """The password of `user`'s broker login kept in Secret `secret`, made if there is none;
    `extra`: further random values the Secret keeps beside it (made once, like the password)."""
    stored = read(secret)
    if stored is not None and {"username", "password"} <= stored.data.keys():
        if stored.data["username"].decode() != user:
            raise ConfigError(f"Secret {secret} names user "
                              f"{stored.data['username'].decode()!r}, not {user!r}")
        if set(extra) <= stored.data.keys():
            return stored.data["password"].decode()
        password = stored.data["password"].decode()
        plan.notes.append(f"added {', '.join(sorted(set(extra) - stored.data.keys()))} to Secret {secret}")
    else:
        password = random_secrets.token_urlsafe(32)
        plan.notes.append(f"created {whose} broker identity (Secret {secret})")
    kept = stored.data if stored is not None else {}
    data = {"username": user.encode(), "password": password.encode(),
            **{k: kept.get(k) or random_secrets.token_hex(16).encode() for k in extra}}
    plan.writes.append(secret_manifest(namespace, secret, data, names.LABELS))
    return password


def _check_no_site_is_named(read, user: str) -> None:
    """A site enrolled under a login deploy needs would be taken over by it: refuse."""
    keys = read(names.NODE_KEYS_SECRET)
    if keys is not None and user in keys.data:
        raise ConfigError(f"a site is enrolled as {user!r}, the broker login of the split-server "
                          f"workers: revoke it (`fsl-edge revoke {user}`) and enroll that site "
                          "under another name, then deploy again")


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


def _plan_auth(plan: SecretPlan, read, namespace: str, password: str,
               worker_password: str | None) -> None:
    stored = read(names.BROKER_AUTH_SECRET)
    data = dict(stored.data) if stored else {}
    passwd = data.get(names.PASSWD_KEY, b"").decode()
    acl = data.get(names.ACL_KEY, b"").decode()
    new_passwd = broker_auth.with_password(passwd, names.COORDINATOR, password)
    new_acl = broker_auth.with_acl(acl, names.COORDINATOR, list(names.COORDINATOR_ACL_TOPICS))
    notes = [f"wrote the coordinator's broker credentials and ACL into Secret "
             f"{names.BROKER_AUTH_SECRET}"] if (new_passwd, new_acl) != (passwd, acl) else []
    if worker_password is not None:
        before = new_passwd, new_acl
        new_passwd = broker_auth.with_password(new_passwd, names.WORKER, worker_password)
        new_acl = broker_auth.with_acl(new_acl, names.WORKER, topics.worker_topics())
        if (new_passwd, new_acl) != before:
            notes.append(f"wrote the split-server workers' broker credentials and ACL into "
                         f"Secret {names.BROKER_AUTH_SECRET}")
        new_acl, upgraded = _with_step_topics(new_acl, read)
        if upgraded:
            notes.append(f"added the step topics to the ACL of sites enrolled before split-server "
                         f"workers: {', '.join(upgraded)}")
    elif _owns_worker_login(read, new_passwd):
        new_passwd, new_acl = broker_auth.without_user(new_passwd, new_acl, names.WORKER)
        notes.append(f"removed the split-server workers' broker login from Secret "
                     f"{names.BROKER_AUTH_SECRET} (split_workers.replicas is 0)")
    if stored is not None and (new_passwd, new_acl) == (passwd, acl):
        return
    data.update({names.PASSWD_KEY: new_passwd.encode(), names.ACL_KEY: new_acl.encode()})
    # The resourceVersion makes the write fail rather than drop a site `enroll` adds meanwhile.
    plan.writes.append(secret_manifest(namespace, names.BROKER_AUTH_SECRET, data, names.LABELS,
                                       resource_version=stored.resource_version if stored else None))
    plan.notes += notes


def _with_step_topics(acl: str, read) -> tuple[str, list[str]]:
    """`acl` where every enrolled site's block holds all of its topics (those enrolled before
    split-server workers existed lack the step topics: the broker would drop their steps
    without a word), and the sites whose block changed."""
    keys = read(names.NODE_KEYS_SECRET)
    upgraded = []
    for site in sorted(set(keys.data if keys else ()) & set(broker_auth.acl_blocks(acl)[1])):
        new = broker_auth.with_acl_entries(acl, site, topics.node_topics(site))
        if new != acl:
            acl = new
            upgraded.append(site)
    return acl, upgraded


def _owns_worker_login(read, passwd: str) -> bool:
    """Whether the password file's worker entry is deploy's (a site may since have been enrolled
    under that name while no workers were deployed)."""
    hashed = broker_auth.passwd_users(passwd).get(names.WORKER)
    stored = read(names.WORKER_MQTT_SECRET)
    return bool(hashed and stored and broker_auth.check_password(
        hashed, stored.data.get("password", b"").decode()))

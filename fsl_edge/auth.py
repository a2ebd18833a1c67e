"""Message authentication: who sent an envelope, that nobody changed it, and that it is new.

- Agent -> coordinator: HMAC-SHA256 with the agent's node key (32 random bytes made by `fsl-edge
  enroll`; the site holds it in FSL_NODE_KEY, the coordinator in its node-keys folder).
- Coordinator -> agents, on each agent's down topic and on the broadcast: Ed25519 with the
  coordinator's signing key (made once by `fsl-edge deploy`, FSL_COORDINATOR_SIGNING_KEY), whose
  public half every agent holds (FSL_COORDINATOR_PUBKEY, from its enroll bundle). A broadcast has
  many readers, so no key they share may sign it: any site could then speak as the coordinator.
  The down topics use the same key, so one rule holds: only the coordinator writes what agents obey.

A MAC or signature covers a label, the topic the envelope is published on (it cannot be moved to
another agent's topic or another run) and the encoded envelope up to the MAC itself, whose auth
block names the sender and its boot id (protocol.py). `ReplayWindow` refuses what was seen before.
No torch here: `fsl-edge enroll` and `fsl-edge deploy` make keys with this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError

if TYPE_CHECKING:
    from .protocol import Envelope, Topic

log = logging.getLogger("fsl_edge.auth")

NODE_KEY_ENV = "FSL_NODE_KEY"
"""An agent's own node key (agent.env)."""
COORDINATOR_PUBKEY_ENV = "FSL_COORDINATOR_PUBKEY"
"""The coordinator's public key, on an agent (agent.env)."""
NODE_KEYS_DIR_ENV = "FSL_NODE_KEYS_DIR"
"""The coordinator's node keys: one file per node (the Secret fsl-node-keys mounted), or a local
node store folder holding NODE_KEYS_JSON."""
SIGNING_KEY_ENV = "FSL_COORDINATOR_SIGNING_KEY"
"""The coordinator's Ed25519 private key (the Secret fsl-coordinator-signing)."""
NODE_KEYS_JSON = "node-keys.json"  # fsl_edge.enroll.store.KEYS_JSON: {node: key}
SIGNING_KEY_FILE = "coordinator-signing.key"
"""In a local node store: the coordinator's signing key, made by the first `enroll --local`."""
COORDINATOR = "coordinator"
"""The coordinator's name as a sender (fsl_edge.coordinator.coordinator.ME)."""
WORKER_PREFIX = "worker."
"""A split-server worker's sender name is this and its id; it signs with the coordinator's key
(it is the coordinator's process, scaled out), so whoever trusts the coordinator trusts it."""
KEY_BYTES = 32

# Why a message was dropped: the names /status counts them under.
UNSIGNED, FORGED, REPLAYED, UNKNOWN_NODE, WRONG_RUN = "unsigned", "forged", "replayed", "unknown_node", "wrong_run"
WHY = {UNSIGNED: "it is not signed, and this process requires signed messages",
       FORGED: "its MAC or signature does not verify (forged, tampered, or sent on another's topic)",
       REPLAYED: "it was seen before, or is older than the replay window",
       UNKNOWN_NODE: "its sender has no key here (never enrolled, or revoked)",
       WRONG_RUN: "it is signed for another run"}


class Scheme(IntEnum):
    """How an envelope is authenticated. Values are on the wire: never renumber, only append."""

    HMAC_SHA256 = 1
    ED25519 = 2


MAC_BYTES = {Scheme.HMAC_SHA256: 32, Scheme.ED25519: 64}
_LABEL = b"fsl-edge auth 1\0"
Parts = Sequence[bytes | memoryview]


def _covered(topic: str, parts: Parts) -> list[bytes | memoryview]:
    # MQTT forbids U+0000 in topic names, so the NUL ends the topic unambiguously
    return [_LABEL, topic.encode(), b"\0", *parts]


# --- keys ---------------------------------------------------------------------------------------


class Key(Protocol):
    scheme: Scheme

    def sign(self, topic: str, parts: Parts) -> bytes: ...

    def verify(self, topic: str, parts: Parts, mac: bytes) -> bool: ...


class NodeKey:
    """A node's secret key: the node MACs with it, the coordinator checks with it."""

    scheme = Scheme.HMAC_SHA256

    def __init__(self, secret: bytes):
        self._secret = secret

    def sign(self, topic: str, parts: Parts) -> bytes:
        h = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in _covered(topic, parts):  # no copy of a large envelope
            h.update(part)
        return h.digest()

    def verify(self, topic: str, parts: Parts, mac: bytes) -> bool:
        return hmac.compare_digest(self.sign(topic, parts), mac)


class PublicKey:
    """The coordinator's public key: agents check its signatures with it."""

    scheme = Scheme.ED25519

    def __init__(self, key: Ed25519PublicKey):
        self._key = key

    def sign(self, topic: str, parts: Parts) -> bytes:
        raise TypeError("a public key cannot sign")

    def verify(self, topic: str, parts: Parts, mac: bytes) -> bool:
        try:
            self._key.verify(mac, b"".join(_covered(topic, parts)))
            return True
        except InvalidSignature:
            return False


class SigningKey(PublicKey):
    """The coordinator's private key."""

    def __init__(self, key: Ed25519PrivateKey):
        super().__init__(key.public_key())
        self._private = key

    def sign(self, topic: str, parts: Parts) -> bytes:
        return self._private.sign(b"".join(_covered(topic, parts)))


def _raw(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{what} is not a key: expected {KEY_BYTES} bytes in base64 (as "
                          "`fsl-edge enroll` and `fsl-edge deploy` write them)")
    return raw


def node_key(text: str, what: str = NODE_KEY_ENV) -> NodeKey:
    return NodeKey(_raw(text, what))


def signing_key(text: str, what: str = SIGNING_KEY_ENV) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(_raw(text, what)))


def public_key(text: str, what: str = COORDINATOR_PUBKEY_ENV) -> PublicKey:
    return PublicKey(Ed25519PublicKey.from_public_bytes(_raw(text, what)))


def new_node_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def new_signing_key() -> str:
    return base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()


def public_key_of(signing: str) -> str:
    """The public half of a signing key, as agents are given it."""
    private = Ed25519PrivateKey.from_private_bytes(_raw(signing, "the coordinator's signing key"))
    return base64.b64encode(private.public_key().public_bytes_raw()).decode()


def read_node_keys(folder: Path) -> dict[str, NodeKey]:
    """Node name -> key, from a node-keys folder (see NODE_KEYS_DIR_ENV); ConfigError if unreadable.

    A missing folder holds no keys yet: Kubernetes mounts the optional Secret only once a site is
    enrolled. In a folder of files, one that holds no key is skipped with a warning (a local
    store's passwd and acl, before its first node) rather than shutting every node out."""
    if not folder.exists():
        return {}
    if not folder.is_dir():
        raise ConfigError(f"{NODE_KEYS_DIR_ENV} {folder} is not a folder")
    try:
        local = folder / NODE_KEYS_JSON
        if local.is_file():
            data = json.loads(local.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise ConfigError(f"{local} must hold a JSON object of node name -> key")
            return {str(name): node_key(text, f"the key of node {name} in {local}") for name, text in data.items()}
        keys = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.name == SIGNING_KEY_FILE or not path.is_file():
                continue  # Kubernetes' ..data links; the signing key of a local store
            try:
                keys[path.name] = node_key(path.read_text(), f"{path}")
            except (ConfigError, UnicodeDecodeError) as e:
                log.warning("skipped %s: %s", path, e)
        return keys
    except ValueError as e:  # JSONDecodeError
        raise ConfigError(f"{folder / NODE_KEYS_JSON} is not valid JSON: {e}") from e
    except OSError as e:
        raise ConfigError(f"cannot read the node keys in {folder}: {e.strerror}") from e


class NodeKeys:
    """The coordinator's node keys, read again as enrollment changes them: every `reload_s`, and
    on a sender it does not know at most once a second. A revoked node is unknown from then on."""

    def __init__(self, folder: str | os.PathLike, reload_s: float = 5.0):
        self.folder, self.reload_s = Path(folder), reload_s
        self._lock = threading.Lock()
        self._keys = read_node_keys(self.folder)  # a bad folder stops the start
        self._read_at = time.monotonic()

    def get(self, name: str) -> NodeKey | None:
        with self._lock:
            age = time.monotonic() - self._read_at
            if age > self.reload_s or (name not in self._keys and age > 1.0):
                self._read_at = time.monotonic()
                try:
                    self._keys = read_node_keys(self.folder)
                except ConfigError as e:  # half-written by hand: keep what worked
                    log.warning("kept the node keys read before: %s", e)
            return self._keys.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)


# --- replay -------------------------------------------------------------------------------------


@dataclass
class _Epoch:
    boot: int
    highest: int
    seen: int = 1  # bit i: sequence number highest - i was seen


class ReplayWindow:
    """Accept each (boot, seq) of a sender once, and nothing older than its window.

    Within one boot of a sender: IPsec's anti-replay window, the highest seq seen and a bitmap of
    the `window` numbers below it; a number below the window is refused, as it can no longer be
    told from a replay. A new boot id is the sender restarted: it becomes the sender's epoch if
    its seq is above everything seen from the sender (protocol.SequenceCounter starts at the wall
    clock in microseconds, so a restarted process's numbers are), and from then on the old boot's
    messages are below the window. A random boot alone could not order epochs: a replay from a
    boot this receiver never saw would pass as a restart. Memory: `window` bits for each of at
    most `max_senders` senders, least recently heard forgotten first; only senders whose MAC
    verified get here, so that is the enrolled nodes.
    """

    def __init__(self, window: int = 4096, max_senders: int = 65536):
        if window < 1 or max_senders < 1:
            raise ValueError(f"window and max_senders must be >= 1, got {window}, {max_senders}")
        self.window, self.max_senders = window, max_senders
        self._full = (1 << window) - 1
        self._senders: OrderedDict[str, _Epoch] = OrderedDict()
        self._lock = threading.Lock()

    def accept(self, sender: str, boot: int, seq: int) -> bool:
        """True if (boot, seq) is new from `sender` (and remember it); False for a replay."""
        with self._lock:
            e = self._senders.get(sender)
            if e is None:
                self._senders[sender] = _Epoch(boot, seq)
                if len(self._senders) > self.max_senders:
                    self._senders.popitem(last=False)
                return True
            self._senders.move_to_end(sender)
            if boot != e.boot:
                if seq <= e.highest:
                    return False
                log.info("%s restarted (boot %016x)", sender, boot)
                e.boot, e.highest, e.seen = boot, seq, 1
                return True
            if seq > e.highest:
                shift = seq - e.highest
                e.seen = ((e.seen << shift) | 1) & self._full if shift < self.window else 1
                e.highest = seq
                return True
            offset = e.highest - seq
            if offset >= self.window or e.seen >> offset & 1:
                return False
            e.seen |= 1 << offset
            return True


# --- one process's view -------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """Who this process is on the wire: its name, its key, and this process's random boot id."""

    sender: str
    key: Key
    boot: int = field(default_factory=lambda: secrets.randbits(64))

    @property
    def scheme(self) -> Scheme:
        return self.key.scheme

    def sign(self, topic: str, parts: Parts) -> bytes:
        return self.key.sign(topic, parts)


class KeyLookup(Protocol):
    def get(self, sender: str) -> Key | None: ...


@dataclass
class Authenticator:
    """Signs what one process sends; decides whether what it receives may be used."""

    signer: Signer
    trusted: KeyLookup | Mapping[str, Key]
    """Sender -> the key its messages verify with: the node keys on the coordinator, the
    coordinator's public key on an agent."""
    require: bool = True
    """Drop unsigned messages (signed ones are checked either way)."""
    window: ReplayWindow = field(default_factory=ReplayWindow)

    def check(self, topic: Topic, topic_name: str, env: Envelope) -> str | None:
        """Why `env`, received on `topic_name`, must be dropped (a reason above); None to use it."""
        sig = env.signature
        if sig is None:
            return UNSIGNED if self.require else None
        key = self.trusted.get(env.sender)
        if key is None:
            return UNKNOWN_NODE
        if topic.channel in ("up", "step") and env.sender != topic.agent:
            return FORGED  # a node speaking on another node's topic
        if topic.channel == "worker" and env.sender != WORKER_PREFIX + topic.agent:
            return FORGED
        if sig.scheme != key.scheme or not key.verify(topic_name, [sig.signed], sig.mac):
            return FORGED
        if env.run_id != topic.run:
            return WRONG_RUN
        if not self.window.accept(env.sender, env.boot, env.seq):
            return REPLAYED
        return None


def agent_authenticator(agent_id: str, environ: Mapping[str, str] | None = None) -> Authenticator | None:
    """An agent's authentication from FSL_NODE_KEY and FSL_COORDINATOR_PUBKEY; None if neither is set."""
    env = os.environ if environ is None else environ
    mine, theirs = env.get(NODE_KEY_ENV), env.get(COORDINATOR_PUBKEY_ENV)
    if not mine and not theirs:
        return None
    if not (mine and theirs):
        raise ConfigError(f"{NODE_KEY_ENV} and {COORDINATOR_PUBKEY_ENV} go together: set both "
                          "(the agent.env of `fsl-edge enroll` has both), or neither for an "
                          "unauthenticated federation")
    return Authenticator(Signer(agent_id, node_key(mine)), WithWorkers({COORDINATOR: public_key(theirs)}))


@dataclass
class WithWorkers:
    """Keys by sender, where the coordinator's is also every split-server worker's."""

    keys: KeyLookup | Mapping[str, Key]
    coordinator: Key | None = None  # None: the key keys has for COORDINATOR

    def get(self, sender: str) -> Key | None:
        if sender == COORDINATOR or sender.startswith(WORKER_PREFIX):
            return self.coordinator or self.keys.get(COORDINATOR)
        return self.keys.get(sender)


def coordinator_authenticator(sender: str = COORDINATOR, require: bool | None = None,
                              environ: Mapping[str, str] | None = None) -> Authenticator | None:
    """The coordinator's authentication from FSL_NODE_KEYS_DIR and its signing key (from
    FSL_COORDINATOR_SIGNING_KEY, or a local store's coordinator-signing.key); None if not
    configured. `require`: drop unsigned messages; None: when keys are configured."""
    env = os.environ if environ is None else environ
    folder, signing = env.get(NODE_KEYS_DIR_ENV), env.get(SIGNING_KEY_ENV)
    if not folder and not signing:
        if require:
            raise ConfigError(f"require_auth is set but no node keys are configured: set "
                              f"{NODE_KEYS_DIR_ENV} and {SIGNING_KEY_ENV}")
        return None
    if not folder:
        raise ConfigError(f"{SIGNING_KEY_ENV} is set but {NODE_KEYS_DIR_ENV} is not: the coordinator "
                          "needs the sites' keys to check their messages")
    if not signing:
        local = Path(folder) / SIGNING_KEY_FILE
        if not local.is_file():
            raise ConfigError(f"{NODE_KEYS_DIR_ENV} is set but the coordinator has no signing key: "
                              f"set {SIGNING_KEY_ENV} (the Secret fsl-coordinator-signing that "
                              "`fsl-edge deploy` makes)")
        try:
            signing = local.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {local}: {e.strerror}") from e
    key = signing_key(signing)
    return Authenticator(Signer(sender, key), WithWorkers(NodeKeys(folder), key), require is not False)


class RateLimitedLog:
    """Warn once per key (reason, sender) every `every_s`, saying how many were held back since."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, max_keys: int = 1024):
        self.logger, self.every_s, self.max_keys = logger, every_s, max_keys
        self._last: OrderedDict[tuple, list] = OrderedDict()  # key -> [logged at, held back]
        self._lock = threading.Lock()

    def warning(self, key: tuple, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._last.get(key)
            if entry is not None and now - entry[0] < self.every_s:
                entry[1] += 1
                return
            held = entry[1] if entry else 0
            self._last[key] = [now, 0]
            self._last.move_to_end(key)
            if len(self._last) > self.max_keys:  # senders are the attacker's to invent
                self._last.popitem(last=False)
        self.logger.warning(msg + (f" ({held} more like it since)" if held else ""), *args)

"""One MQTT connection that speaks the fsl-edge protocol: chunked envelopes out, whole ones in.

paho runs the network loop in its own thread and reconnects by itself (with backoff) after the
broker goes away; subscriptions are renewed on every connect because a restarted broker without
persistence has forgotten the session. Incoming chunks are reassembled and decoded in paho's
thread and handed over through a bounded queue served round-robin by sender (fsl_edge.inbox),
so the process's own loop stays single-threaded and one flooding sender delays no one else.
Nothing raised while decoding may escape a paho callback (it would stop paho's thread): bad
input is counted by reason and dropped. With an `auth.Authenticator`, every envelope sent is
signed and every one received is checked (sender, MAC, run, replay) before anyone sees it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import Counter
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from . import auth, protocol
from .chunking import DEFAULT_MAX_PACKET, Reassembler, split_message
from .config import Bounds
from .errors import CodecError, ConfigError, LimitError, ProtocolError, TransportError
from .inbox import FairInbox

log = logging.getLogger("fsl_edge.transport")


def parse_broker_url(url: str) -> tuple[str, int]:
    """mqtt://host:port or mqtts://host:port (TLS) -> (host, port)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"broker URL {url!r} is not of the form mqtt://host:port or "
                          "mqtts://host:port")
    try:
        port = parsed.port
    except ValueError as e:
        raise ConfigError(f"broker URL {url!r} has a bad port: {e}") from None
    return parsed.hostname, port or (8883 if parsed.scheme == "mqtts" else 1883)


@dataclass(frozen=True)
class BrokerLogin:
    """Who this process is to the broker, and which CA vouches for the broker (mqtts://).

    Read from the environment (FSL_MQTT_USERNAME, FSL_MQTT_PASSWORD, FSL_MQTT_CA_FILE, and for
    mutual TLS FSL_MQTT_CERT_FILE and FSL_MQTT_KEY_FILE: what the coordinator's pod and a site's
    agent.env set), so no secret sits in a config file or a settings dump."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    """This client's certificate (PEM), for a broker that requires one (mTLS)."""
    key_file: str | None = None
    """Its private key (PEM, unencrypted)."""

    @classmethod
    def from_env(cls, environ=None) -> BrokerLogin:
        env = os.environ if environ is None else environ
        login = cls(*(env.get(f"FSL_MQTT_{k}") or None
                      for k in ("USERNAME", "PASSWORD", "CA_FILE", "CERT_FILE", "KEY_FILE")))
        if login.password and not login.username:
            raise ConfigError("FSL_MQTT_PASSWORD is set but FSL_MQTT_USERNAME is not")
        if bool(login.cert_file) != bool(login.key_file):
            raise ConfigError("FSL_MQTT_CERT_FILE and FSL_MQTT_KEY_FILE go together: set both or neither")
        for var, path in (("CA_FILE", login.ca_file), ("CERT_FILE", login.cert_file),
                          ("KEY_FILE", login.key_file)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"FSL_MQTT_{var} {path} is not a file")
        return login


def sender_of(topic: protocol.Topic) -> str | None:
    """Whose queue a message waits in: the agent's for what agents send (up, step, status), a
    worker's for what it sends; one queue
    (None) for what the coordinator sends (down, broadcast), which keeps those in order."""
    if topic.channel == "worker":
        return "worker:" + topic.agent  # apart from an agent of the same name
    return topic.agent if topic.channel in ("up", "step", "status") else None


@dataclass
class Received:
    topic: protocol.Topic
    envelope: protocol.Envelope
    size: int  # bytes of the whole (reassembled) envelope
    received_at: float = field(default_factory=time.monotonic)  # in paho's thread, on arrival


class MqttLink:
    """A client id, its subscriptions and last will; `publish` and `get` carry envelopes."""

    def __init__(self, url: str, client_id: str, subscriptions: list[str],
                 will: tuple[str, bytes] | None = None, online: tuple[str, bytes] | None = None,
                 max_packet: int = DEFAULT_MAX_PACKET, limits: protocol.Limits = protocol.Limits(),
                 bounds: Bounds = Bounds(), login: BrokerLogin = BrokerLogin(),
                 authenticator: auth.Authenticator | None = None, persistent: bool = True):
        self.host, self.port = parse_broker_url(url)
        self.auth = authenticator
        self.refused: str | None = None  # why the broker last refused us, for the error
        self.url, self.subscriptions, self.online = url, subscriptions, online
        self.max_packet, self.limits = max_packet, limits
        self.rejected: Counter[str] = Counter()
        self.inbox: FairInbox[Received] = FairInbox(bounds.inbox_per_sender, bounds.inbox_bytes,
                                                    on_drop=self._count)
        self.connected = threading.Event()
        self.reconnects = 0
        self._ever_connected = False
        self._reassembler = Reassembler(max_buffered_per_sender=bounds.reassembly_per_sender,
                                        max_buffered_total=bounds.reassembly_bytes,
                                        max_message_bytes=limits.max_message_bytes,
                                        deadline_s=bounds.chunk_deadline_s)
        self._dups = protocol.DuplicateFilter()  # unauthenticated envelopes only
        self._refusals = auth.RateLimitedLog(log)
        self._seq = protocol.SequenceCounter()
        self._lock = threading.Lock()  # publish order
        self._count_lock = threading.Lock()  # drop counts, written by paho's thread
        # persistent session (clean_session=False): QoS-1 messages queued while we were away
        # are delivered on reconnect. A split-server worker's is clean: a worker gone for good
        # must not stay in the shared subscription, queueing the steps the broker deals it
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not persistent, protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        if url.startswith("mqtts://"):
            # the broker's certificate must chain to the CA (the system's when none is given)
            # and name the host we dialled; ours goes with it when the broker asks (mTLS)
            try:
                self.client.tls_set(ca_certs=login.ca_file, certfile=login.cert_file,
                                    keyfile=login.key_file)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise ConfigError(f"cannot load the TLS files for {url}: {e}") from e
        elif login.cert_file:
            raise ConfigError(f"a client certificate (FSL_MQTT_CERT_FILE) needs TLS: the broker "
                              f"URL {url} is not mqtts://")
        if login.username:
            self.client.username_pw_set(login.username, login.password)
        self.client.max_queued_messages_set(0)
        if will:
            self.client.will_set(will[0], will[1], qos=protocol.QOS, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- lifecycle ---
    def start(self, timeout: float = 30.0) -> None:
        """Connect (retrying in the background) and wait until the first connection is up."""
        self.client.connect_async(self.host, self.port, keepalive=15)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            why = f": it refused us ({self.refused})" if self.refused else ""
            raise TransportError(f"no connection to the broker at {self.url} within "
                                 f"{timeout:.0f} s{why}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.warning("broker %s refused the connection: %s", self.url, reason_code)
            return
        # Every step is a request and its reply: Nagle's algorithm holds a small write back until
        # the previous one is acknowledged, and with delayed ACKs that cost ~40 ms per hop
        # (88 ms for a round trip on loopback, 0.6 ms without). paho does not set it.
        with contextlib.suppress(OSError, AttributeError):
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=protocol.QOS)
        if self.online:
            client.publish(self.online[0], self.online[1], qos=protocol.QOS, retain=True)
        if self._ever_connected:
            self.reconnects += 1
            log.info("reconnected to %s", self.url)
        self._ever_connected = True
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        log.info("disconnected from %s (%s); paho reconnects", self.url, reason_code)

    # --- in ---
    def _on_message(self, client, userdata, msg):
        try:
            topic = protocol.parse_topic(msg.topic)
            if topic.channel == "status":
                env = protocol.Envelope(protocol.MessageKind.STATUS, topic.run, topic.agent or "",
                                        meta={"state": msg.payload.decode("ascii", "replace")})
                self.inbox.put(sender_of(topic), Received(topic, env, len(msg.payload)), len(msg.payload))
                return
            whole = self._reassembler.feed(msg.topic, msg.payload)
            if whole is None:
                return
            env = protocol.decode_envelope(whole, self.limits)
            if self.auth is not None and not self._authentic(topic, msg, env):
                return
            # a verified envelope went through the sender's replay window instead; an
            # unverified one must not poison that with a sequence number of its choosing
            if (self.auth is None or env.signature is None) and self._dups.is_duplicate(msg.topic, env.seq):
                self._count("duplicate")
                return
            if not self.inbox.put(sender_of(topic), Received(topic, env, len(whole)), len(whole)):
                log.debug("inbox full for %s: dropped a %s", topic.agent, env.kind.name)
        except LimitError as e:
            self._count("overflow")
            log.warning("dropped a message on %s: %s", msg.topic, e)
        except (ProtocolError, CodecError) as e:
            self._count("version" if "version" in str(e) else "malformed")
            log.warning("dropped a message on %s: %s", msg.topic, e)
        except Exception:  # noqa: BLE001 - paho's thread must survive anything
            self._count("malformed")
            log.exception("unexpected error decoding a message on %s", msg.topic)

    def _authentic(self, topic: protocol.Topic, msg, env: protocol.Envelope) -> bool:
        reason = self.auth.check(topic, msg.topic, env)
        if reason is None:
            return True
        if reason == auth.REPLAYED and msg.dup:
            reason = "duplicate"  # the broker says it delivers this again: QoS 1, not an attack
        else:
            claimed = env.sender or topic.agent or env.agent_id  # unverified: who it claims
            self._refusals.warning((reason, claimed), "dropped a message (%s) on %s from %r: %s",
                                   reason, msg.topic, claimed, auth.WHY[reason])
        self._count(reason)
        return False

    def _count(self, reason: str) -> None:
        with self._count_lock:
            self.rejected[reason] += 1

    def rejected_counts(self) -> Counter[str]:
        """A copy of the drop counts (paho's thread adds to them)."""
        with self._count_lock:
            counts = Counter(self.rejected)
        counts["evicted"] += self._reassembler.stats["evicted"]
        return +counts  # without zero counts

    def get(self, timeout: float | None) -> Received | None:
        """The next decoded envelope, or None after `timeout` seconds."""
        self._reassembler.expire()
        return self.inbox.get(timeout)

    # --- out ---
    def publish(self, topic: str, env: protocol.Envelope) -> int:
        """Encode, chunk and publish at QoS 1; returns the bytes handed to the broker."""
        with self._lock:  # sequence numbers in publish order
            env.seq = self._seq.next()
            data = protocol.encode_envelope(env, self.auth.signer if self.auth else None, topic)
            for chunk in split_message(data, self.max_packet):
                self.client.publish(topic, chunk, qos=protocol.QOS)
        return len(data)

    def publish_status(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=protocol.QOS, retain=True)

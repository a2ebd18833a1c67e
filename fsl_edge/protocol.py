"""THE wire protocol: version, message kinds, topics, the binary envelope, duplicate detection.

No other module spells a topic string or an envelope field. Only MQTT 3.1.1 semantics are used
(no MQTT 5 properties), so Mosquitto, EMQX, cloud brokers and the embedded amqtt all serve.

Envelope layout (all integers little-endian)::

    header   magic "FSLE" | version u8 | kind u8 | flags u16 | round u32 | step u32 | seq u64
             | len(run_id) u8 | len(agent_id) u8 | n_tensors u16 | len(meta) u32      (32 bytes)
    auth     (flag SIGNED only) boot u64 | scheme u8 | len(sender) u8 | sender (utf-8)
    run_id, agent_id (utf-8), meta (JSON object, utf-8)
    per tensor: len(name) u8, name | dtype code u8 | ndim u8 | dims u64 * ndim
                | n_stages u8, per stage: len u8, spec (ascii) | payload length u64
    payloads, in table order
    mac      (flag SIGNED only) 32 bytes (HMAC-SHA256) or 64 (Ed25519), by scheme
    crc32 u32 of everything above

An unsigned envelope is byte for byte what it was before signing existed, so an unsigned peer's
message still decodes and is refused as unsigned, not as garbage. The MAC covers the topic and
everything from the magic up to the MAC (fsl_edge.auth); `seq` with the sender's random `boot`
lets a receiver refuse replays. Decoding checks magic, version, size and checksum first, then
every declared length against the bytes actually left and against `Limits`, so nothing is
allocated on a sender's word.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

import torch

from fsl_edge import codec
from fsl_edge.auth import MAC_BYTES, WORKER_PREFIX, Scheme, Signer  # noqa: F401 (WORKER_PREFIX)
from fsl_edge.errors import ProtocolError

PROTOCOL_VERSION = 1
MAGIC = b"FSLE"
QOS = 1  # at-least-once; redeliveries are caught by DuplicateFilter
MQTT_PROTOCOL_LEVEL = 4  # MQTT 3.1.1 (paho.mqtt.client.MQTTv311); never MQTT 5
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"  # also the last will on the retained status topic


class MessageKind(IntEnum):
    """What an envelope carries. Values are on the wire: never renumber, only append."""

    HELLO = 1
    HEARTBEAT = 2
    ROUND_START = 3
    ADAPTER_DOWN = 4
    ACTIVATION_UP = 5
    ACTIVATION_DOWN = 6
    GRADIENT_UP = 7
    GRADIENT_DOWN = 8
    LOSS = 9
    ADAPTER_UP = 10
    ROUND_END = 11
    ERROR = 12
    STATUS = 13


class Flag(IntFlag):
    """Envelope flags; a decoder rejects bits it does not know."""

    NONE = 0
    RESEND = 1  # the sender repeats a step after a reconnect; apply at most once
    SIGNED = 2  # an auth block follows the header and a MAC precedes the checksum


_KNOWN_FLAGS = sum(Flag)

# dtype wire codes; the names are codec's (codec.DTYPES). Append only.
DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "int64": 4, "int32": 5, "int8": 6, "uint8": 7, "bool": 8}
_DTYPE_OF_CODE = {code: name for name, code in DTYPE_CODES.items()}

_HEADER = struct.Struct("<4sBBHIIQBBHI")
_AUTH = struct.Struct("<QBB")
_CRC = struct.Struct("<I")
_U8, _U64 = struct.Struct("<B"), struct.Struct("<Q")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # topic-safe: no '/', '+', '#'


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    """Return value if it is a valid run or agent id, else raise ProtocolError saying why."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"{what} {value!r} is invalid: expected 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    return value


# --- topics -------------------------------------------------------------------------------------


def topic_up(run: str, agent: str) -> str:
    """Agent -> coordinator."""
    return f"fsl/{check_id(run, 'run id')}/agent/{check_id(agent, 'agent id')}/up"


def topic_down(run: str, agent: str) -> str:
    """Coordinator -> one agent."""
    return f"fsl/{check_id(run, 'run id')}/agent/{check_id(agent, 'agent id')}/down"


def topic_all_up(run: str) -> str:
    """The coordinator's subscription to every agent's up topic."""
    return f"fsl/{check_id(run, 'run id')}/agent/+/up"


def topic_broadcast(run: str) -> str:
    """Coordinator -> every agent."""
    return f"fsl/{check_id(run, 'run id')}/broadcast"


def topic_status(run: str, agent: str) -> str:
    """Retained online/offline of one agent; its last will publishes STATUS_OFFLINE here."""
    return f"fsl/{check_id(run, 'run id')}/status/{check_id(agent, 'agent id')}"


def topic_all_status(run: str) -> str:
    return f"fsl/{check_id(run, 'run id')}/status/+"


def topic_probe(run: str, agent: str) -> str:
    """An agent's own link probe (fsl_edge.profile): it writes and reads it, nobody else listens."""
    return f"fsl/{check_id(run, 'run id')}/probe/{check_id(agent, 'agent id')}"


# --- split-server workers (SplitFed-V1, training.split.server "per-site") ------------------------
# An agent's first step of a round goes to the workers' shared subscription: one worker gets it,
# serves that agent for the rest of the round, and says so in its reply; the agent then sends its
# steps to that worker alone. A worker signs as auth.WORKER_PREFIX + its id, with the
# coordinator's key.

SHARE_GROUP = "fsl-split"  # the workers' shared-subscription group


def topic_step(run: str, agent: str) -> str:
    """Agent -> whichever worker the broker picks (a round's first step)."""
    return f"fsl/{check_id(run, 'run id')}/agent/{check_id(agent, 'agent id')}/step"


def topic_step_to(run: str, agent: str, worker: str) -> str:
    """Agent -> the worker serving it this round."""
    return f"{topic_step(run, agent)}/{check_id(worker, 'worker id')}"


def topic_shared_steps(run: str, group: str = SHARE_GROUP) -> str:
    """The workers' shared subscription to every agent's first steps. Brokers' ACLs seldom check
    subscriptions (Mosquitto's file ACL does not), so a deployment names its own secret group
    (FSL_SHARE_GROUP): a site that cannot name it cannot join it."""
    return f"$share/{check_id(group, 'share group')}/fsl/{check_id(run, 'run id')}/agent/+/step"


def topic_worker_steps(run: str, worker: str) -> str:
    """One worker's subscription to the steps of the agents it serves."""
    return f"fsl/{check_id(run, 'run id')}/agent/+/step/{check_id(worker, 'worker id')}"


def topic_trunk(run: str) -> str:
    """Coordinator -> every worker: the round's trunk adapter."""
    return f"fsl/{check_id(run, 'run id')}/trunk"


def topic_worker_up(run: str, worker: str) -> str:
    """Worker -> coordinator: its hello, and each agent's trunk copy at the agent's last step."""
    return f"fsl/{check_id(run, 'run id')}/worker/{check_id(worker, 'worker id')}/up"


def topic_all_worker_up(run: str) -> str:
    return f"fsl/{check_id(run, 'run id')}/worker/+/up"


class Topic(NamedTuple):
    run: str
    channel: str  # "up" | "down" | "step" | "broadcast" | "status" | "probe" | "trunk" | "worker"
    agent: str | None  # the agent (up, down, step, status, probe), the worker (worker)
    worker: str | None = None  # step: the worker it is addressed to; None: any worker


def parse_topic(topic: str) -> Topic:
    """Split a topic of this protocol into its parts; ProtocolError for anything else."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[0] == "fsl" and _ID.fullmatch(parts[1]):
        if len(parts) == 5 and parts[2] == "agent" and parts[4] in ("up", "down") and _ID.fullmatch(parts[3]):
            return Topic(parts[1], parts[4], parts[3])
        if len(parts) == 3 and parts[2] in ("broadcast", "trunk"):
            return Topic(parts[1], parts[2], None)
        if len(parts) in (5, 6) and parts[2] == "agent" and parts[4] == "step" \
                and all(_ID.fullmatch(p) for p in parts[5:] + [parts[3]]):
            return Topic(parts[1], "step", parts[3], parts[5] if len(parts) == 6 else None)
        if len(parts) == 5 and parts[2] == "worker" and parts[4] == "up" and _ID.fullmatch(parts[3]):
            return Topic(parts[1], "worker", parts[3])
        if len(parts) == 4 and parts[2] in ("status", "probe") and _ID.fullmatch(parts[3]):
            return Topic(parts[1], parts[2], parts[3])
    raise ProtocolError(f"topic {topic!r} is not part of the fsl-edge protocol")


# --- envelope -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Upper bounds a decoder enforces before it allocates anything."""

    max_message_bytes: int = 512 << 20
    """A whole envelope, after reassembly of its chunks."""
    max_tensor_bytes: int = 256 << 20
    """One decoded tensor (elements x item size)."""
    max_tensors: int = 4096
    """Tensors per envelope; a LoRA adapter of a 30-layer model has ~420."""
    max_meta_bytes: int = 1 << 20
    max_ndim: int = 8
    max_stages: int = 16


@dataclass(frozen=True)
class WireTensor:
    """One encoded tensor: its name, the meta needed to decode it, and the payload bytes."""

    name: str
    meta: codec.TensorMeta
    payload: bytes | memoryview  # a view into the received message: decoding copies nothing twice


@dataclass(frozen=True)
class Signature:
    """The MAC of a received envelope and what it covers, for fsl_edge.auth to check."""

    scheme: Scheme
    mac: bytes
    signed: memoryview
    """The envelope from its magic up to the MAC (the topic is the receiver's to add)."""


@dataclass
class Envelope:
    """One protocol message. agent_id is the agent it is from or for ("" when about all agents).

    sender, boot and signature are set by decode_envelope from a signed envelope's auth block;
    encode_envelope takes them from its signer."""

    kind: MessageKind
    run_id: str
    agent_id: str = ""
    round: int = 0
    step: int = 0
    seq: int = 0
    flags: Flag = Flag.NONE
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[WireTensor] = field(default_factory=list)
    sender: str = ""
    boot: int = 0
    signature: Signature | None = field(default=None, compare=False, repr=False)

    def add_tensor(self, name: str, t: torch.Tensor, stages: list[str] | tuple[str, ...] = ("raw",)) -> None:
        payload, meta = codec.encode_tensor(t, stages)
        self.tensors.append(WireTensor(name, meta, payload))

    def tensor(self, name: str, max_bytes: int = Limits.max_tensor_bytes) -> torch.Tensor:
        """Decode the tensor called name; ProtocolError if absent, CodecError if malformed."""
        for wt in self.tensors:
            if wt.name == name:
                return codec.decode_tensor(wt.payload, wt.meta, max_bytes)
        raise ProtocolError(f"{self.kind.name} message has no tensor {name!r} (has {[w.name for w in self.tensors]})")

    def tensor_dict(self, max_bytes: int = Limits.max_tensor_bytes) -> dict[str, torch.Tensor]:
        return {wt.name: codec.decode_tensor(wt.payload, wt.meta, max_bytes) for wt in self.tensors}


def encode_envelope(env: Envelope, signer: Signer | None = None, topic: str = "") -> bytes:
    """Serialise an envelope, signed by `signer` for `topic` when given; ProtocolError if a field
    cannot be represented."""
    check_id(env.run_id, "run id")
    if signer is not None:
        check_id(signer.sender, "sender")
        if not topic:
            raise ProtocolError("a signed envelope needs the topic it is published on")
    if env.agent_id:
        check_id(env.agent_id, "agent id")
    for value, what, bits in ((env.round, "round", 32), (env.step, "step", 32), (env.seq, "seq", 64)):
        if not 0 <= value < 1 << bits:
            raise ProtocolError(f"{what} {value} does not fit in an unsigned {bits}-bit field")
    if not isinstance(env.meta, dict):
        raise ProtocolError(f"meta must be a dict, got {type(env.meta).__name__}")
    try:
        meta = json.dumps(env.meta, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"meta must hold only JSON values (finite numbers, str, list, dict): {e}") from e
    run, agent = env.run_id.encode(), env.agent_id.encode()
    flags = int(env.flags) & ~Flag.SIGNED | (Flag.SIGNED if signer is not None else 0)
    parts = [_HEADER.pack(MAGIC, PROTOCOL_VERSION, int(env.kind), flags, env.round, env.step, env.seq,
                          len(run), len(agent), len(env.tensors), len(meta))]
    if signer is not None:
        sender = signer.sender.encode()
        parts += [_AUTH.pack(signer.boot, int(signer.scheme), len(sender)), sender]
    parts += [run, agent, meta]
    parts += [_tensor_entry(wt) for wt in env.tensors]
    parts += [wt.payload for wt in env.tensors]
    if signer is not None:
        parts.append(signer.sign(topic, parts))
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([*parts, _CRC.pack(crc)])


def _tensor_entry(wt: WireTensor) -> bytes:
    name = wt.name.encode()
    if not 0 < len(name) < 256:
        raise ProtocolError(f"tensor name {wt.name!r} must be 1-255 utf-8 bytes")
    if wt.meta.dtype not in DTYPE_CODES or len(wt.meta.shape) > 255 or len(wt.meta.stages) > 255:
        raise ProtocolError(f"tensor {wt.name!r}: {wt.meta} cannot be represented on the wire")
    out = [_U8.pack(len(name)), name, struct.pack("<BB", DTYPE_CODES[wt.meta.dtype], len(wt.meta.shape)),
           struct.pack(f"<{len(wt.meta.shape)}Q", *wt.meta.shape), _U8.pack(len(wt.meta.stages))]
    for spec in wt.meta.stages:
        raw = spec.encode("ascii")
        if len(raw) > 255:
            raise ProtocolError(f"tensor {wt.name!r}: stage spec {spec!r} is longer than 255 bytes")
        out += [_U8.pack(len(raw)), raw]
    out.append(_U64.pack(len(wt.payload)))
    return b"".join(out)


class _Reader:
    """A cursor that refuses to read past the declared end of the buffer."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.view) - self.pos:
            raise ProtocolError(f"truncated envelope: {what} needs {n} bytes, {len(self.view) - self.pos} left")
        self.pos += n
        return self.view[self.pos - n : self.pos]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def decode_envelope(data: bytes | memoryview, limits: Limits = Limits()) -> Envelope:
    """Parse and validate an envelope; ProtocolError with a specific message if it is bad."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size + _CRC.size:
        raise ProtocolError(f"truncated envelope: {len(view)} bytes, the header alone needs {_HEADER.size + _CRC.size}")
    if bytes(view[:4]) != MAGIC:
        raise ProtocolError(f"bad magic {bytes(view[:4])!r}, expected {MAGIC!r}: not an fsl-edge envelope")
    if view[4] != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown protocol version {view[4]}; this build speaks version {PROTOCOL_VERSION}")
    if len(view) > limits.max_message_bytes:
        raise ProtocolError(f"envelope of {len(view)} bytes exceeds the limit {limits.max_message_bytes}")
    body = view[: -_CRC.size]
    (declared,) = _CRC.unpack(view[-_CRC.size :])
    if zlib.crc32(body) != declared:
        raise ProtocolError("checksum mismatch: the envelope was corrupted or truncated in transit")

    _, _, kind, flags, rnd, step, seq, run_len, agent_len, n_tensors, meta_len = _HEADER.unpack_from(body)
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
    mac_len = 0
    if flags & Flag.SIGNED:
        if len(body) < _HEADER.size + _AUTH.size:
            raise ProtocolError(f"truncated envelope: {len(body)} bytes cannot hold a signed header")
        scheme = body[_HEADER.size + 8]
        if scheme not in MAC_BYTES:
            raise ProtocolError(f"unknown authentication scheme {scheme}")
        mac_len = MAC_BYTES[Scheme(scheme)]
        if len(body) - mac_len < _HEADER.size + _AUTH.size:
            raise ProtocolError(f"truncated envelope: {len(body)} bytes cannot hold a header and a "
                                f"{mac_len}-byte MAC")
    signed = body[: len(body) - mac_len]
    r = _Reader(signed)
    r.take(_HEADER.size, "header")
    sender, boot, signature = "", 0, None
    if flags & Flag.SIGNED:
        boot, scheme, sender_len = r.unpack(_AUTH, "auth block")
        sender = check_id(_utf8(r.take(sender_len, "sender"), "sender"), "sender")
        signature = Signature(Scheme(scheme), bytes(body[len(signed):]), signed)
    if n_tensors > limits.max_tensors:
        raise ProtocolError(f"{n_tensors} tensors declared, the limit is {limits.max_tensors}")
    if meta_len > limits.max_meta_bytes:
        raise ProtocolError(f"meta of {meta_len} bytes declared, the limit is {limits.max_meta_bytes}")
    run_id = check_id(_utf8(r.take(run_len, "run id"), "run id"), "run id")
    agent_id = _utf8(r.take(agent_len, "agent id"), "agent id")
    if agent_id:
        check_id(agent_id, "agent id")
    meta = _parse_meta(r.take(meta_len, "meta"))

    table = [_read_entry(r, limits) for _ in range(n_tensors)]
    if len({name for name, _, _ in table}) != len(table):
        raise ProtocolError("duplicate tensor names in one envelope")
    if sum(n for _, _, n in table) != len(signed) - r.pos:
        raise ProtocolError(f"tensor table declares {sum(n for _, _, n in table)} payload bytes, "
                            f"{len(signed) - r.pos} are present")
    tensors = [WireTensor(name, meta_, r.take(n, f"payload of {name}")) for name, meta_, n in table]
    return Envelope(kind, run_id, agent_id, rnd, step, seq, Flag(flags & ~Flag.SIGNED), meta, tensors,
                    sender, boot, signature)


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} is not valid utf-8") from e


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_meta(raw: memoryview) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        meta = json.loads(bytes(raw), parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"meta is not valid JSON: {e}") from e
    except RecursionError:  # a few thousand '[' fit in max_meta_bytes
        raise ProtocolError("meta is nested too deeply to be what fsl-edge sends") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"meta must be a JSON object, got {type(meta).__name__}")
    return meta


def _read_entry(r: _Reader, limits: Limits) -> tuple[str, codec.TensorMeta, int]:
    (name_len,) = r.unpack(_U8, "tensor name length")
    name = _utf8(r.take(name_len, "tensor name"), "tensor name")
    code, ndim = struct.unpack("<BB", r.take(2, f"dtype and ndim of {name}"))
    if code not in _DTYPE_OF_CODE:
        raise ProtocolError(f"tensor {name!r}: unknown dtype code {code}")
    if ndim > limits.max_ndim:
        raise ProtocolError(f"tensor {name!r}: {ndim} dimensions, the limit is {limits.max_ndim}")
    shape = struct.unpack(f"<{ndim}Q", r.take(8 * ndim, f"shape of {name}"))
    dtype = _DTYPE_OF_CODE[code]
    nbytes = codec.itemsize(dtype)
    for dim in shape:  # multiply step by step so a huge shape cannot build a huge int first
        nbytes *= dim
        if nbytes > limits.max_tensor_bytes:
            raise ProtocolError(f"tensor {name!r}: shape {shape} {dtype} exceeds the limit {limits.max_tensor_bytes} bytes")
    (n_stages,) = r.unpack(_U8, f"stage count of {name}")
    if not 0 < n_stages <= limits.max_stages:
        raise ProtocolError(f"tensor {name!r}: {n_stages} codec stages, expected 1-{limits.max_stages}")
    stages = []
    for _ in range(n_stages):
        (spec_len,) = r.unpack(_U8, f"stage length of {name}")
        try:
            stages.append(bytes(r.take(spec_len, f"stage of {name}")).decode("ascii"))
        except UnicodeDecodeError as e:
            raise ProtocolError(f"tensor {name!r}: stage spec is not ascii") from e
    (payload_len,) = r.unpack(_U64, f"payload length of {name}")
    return name, codec.TensorMeta(dtype, shape, tuple(stages)), payload_len


# --- at-most-once delivery on top of QoS 1 ------------------------------------------------------


class SequenceCounter:
    """Sequence numbers for one sender, increasing across restarts of the sender.

    They start at the wall clock in microseconds, so a restarted process does not reuse numbers
    that a receiver's DuplicateFilter still remembers, as long as the clock does not step back and
    the sender averages under a million messages a second.
    """

    def __init__(self, start: int | None = None):
        self._last = (time.time_ns() // 1000 if start is None else start) - 1
        self._follow_clock = start is None
        self._lock = threading.Lock()

    def next(self) -> int:
        # never below the clock: a sender started before its clock was set (an edge device
        # without a hardware clock) catches up once NTP has set it, instead of staying below
        # what a receiver saw from its previous run
        with self._lock:
            now = time.time_ns() // 1000 if self._follow_clock else 0
            self._last = max(self._last + 1, now)
            return self._last


class DuplicateFilter:
    """Recognise QoS-1 redeliveries by (sender, sequence number) in a sliding window.

    Memory is bounded: `window` bits per sender, at most `max_senders` senders (least recently
    heard forgotten first). A number older than the window is reported as a duplicate, because
    it can no longer be told apart from one (IPsec's anti-replay rule).
    """

    def __init__(self, window: int = 4096, max_senders: int = 1024):
        if window < 1 or max_senders < 1:
            raise ValueError(f"window and max_senders must be >= 1, got {window}, {max_senders}")
        self.window, self.max_senders = window, max_senders
        self._full = (1 << window) - 1
        self._senders: OrderedDict[Hashable, list[int]] = OrderedDict()  # sender -> [highest, bits]
        self._lock = threading.Lock()

    def is_duplicate(self, sender: Hashable, seq: int) -> bool:
        """Return True if (sender, seq) was seen already; otherwise remember it and return False."""
        with self._lock:
            state = self._senders.get(sender)
            if state is None:
                self._senders[sender] = [seq, 1]
                if len(self._senders) > self.max_senders:
                    self._senders.popitem(last=False)
                return False
            self._senders.move_to_end(sender)
            highest, bits = state
            if seq > highest:  # bit i of `bits` stands for sequence number highest - i
                shift = seq - highest
                state[:] = [seq, ((bits << shift) | 1) & self._full if shift < self.window else 1]
                return False
            offset = highest - seq
            if offset >= self.window or bits >> offset & 1:
                return True
            state[1] = bits | 1 << offset
            return False

    def forget(self, sender: Hashable) -> None:
        with self._lock:
            self._senders.pop(sender, None)

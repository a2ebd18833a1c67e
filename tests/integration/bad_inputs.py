"""Bad input a rogue client on the broker sends into a real run: garbage, forgeries, replays.

Shared by the tests that send it (test_wire_faults.py, test_auth_runtime.py) and by
bench/reliability.py, whose `campaign` sends every kind at a signed run and counts what the
coordinator's status says it refused. Free of pytest, like brokers.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
import zlib
from dataclasses import dataclass

import torch

from fsl_edge import auth, protocol
from fsl_edge.auth import Signer
from fsl_edge.broker import BrokerProcess
from fsl_edge.cli.federation import Federation
from fsl_edge.errors import ProtocolError
from fsl_edge.protocol import Envelope, MessageKind, decode_envelope, encode_envelope

from .brokers import mqtt_client
from .runtime_harness import in_round, wait_for

HIDDEN = 32  # tiny-random-llama


@dataclass(frozen=True)
class Bad:
    what: str
    topic: str
    payload: bytes
    reason: str
    """The status counter it must land in."""


def reseal(data: bytearray) -> bytes:
    """Recompute the checksum, as an attacker would: the check under test must catch the change."""
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return bytes(data)


def activation(run: str, agent: str, hidden: torch.Tensor) -> Envelope:
    env = Envelope(MessageKind.ACTIVATION_UP, run, agent, round=1, step=0)
    B, T = hidden.shape[:2]
    env.add_tensor("hidden", hidden)
    env.add_tensor("attention_mask", torch.ones(B, T, dtype=torch.long))
    env.add_tensor("position_ids", torch.arange(T).expand(B, T).contiguous())
    return env


def garbage(run: str, seq=None) -> list[Bad]:
    """Bytes no decoder may accept: refused before anyone asks who sent them."""
    seq = seq or itertools.count(1)
    up = protocol.topic_up(run, "mallory")

    def heartbeat() -> bytearray:
        return bytearray(encode_envelope(Envelope(MessageKind.HEARTBEAT, run, "mallory", seq=next(seq))))

    wrong_version, oversize = heartbeat(), heartbeat()
    wrong_version[4] = 99
    struct.pack_into("<I", oversize, 28, 0xFFFFFFF0)  # declares a 4 GiB meta field
    return [Bad("not an envelope", protocol.topic_up(run, "circulatory"), b"not an envelope at all",
                "malformed"),
            Bad("unknown protocol version", up, reseal(wrong_version), "version"),
            Bad("a 4 GiB field declared", up, reseal(oversize), "malformed")]


def forgeries(topic: str, genuine: bytes, seq: int) -> list[Bad]:
    """Messages claiming to be the agent that sent `genuine` (a signed envelope captured on
    `topic`): unsigned, a MAC under another key, the capture replayed, the capture tampered
    with, and a never-enrolled node. `seq`: above any the agent has used."""
    env = decode_envelope(genuine)
    run, agent = env.run_id, env.sender

    def heartbeat(sender: str = agent) -> Envelope:
        return Envelope(MessageKind.HEARTBEAT, run, sender, seq=seq)

    tampered = bytearray(genuine)  # one byte of its last tensor's payload, just before the MAC
    tampered[-4 - auth.MAC_BYTES[auth.Scheme.HMAC_SHA256] - 1] ^= 0x01
    intruder = Signer("intruder", auth.node_key(auth.new_node_key()))
    intruder_up = protocol.topic_up(run, "intruder")
    return [
        Bad("unsigned", topic, encode_envelope(heartbeat()), auth.UNSIGNED),
        Bad("forged MAC", topic, encode_envelope(
            heartbeat(), Signer(agent, auth.node_key(auth.new_node_key())), topic), auth.FORGED),
        Bad("replayed activation", topic, genuine, auth.REPLAYED),
        Bad("tampered activation", topic, reseal(tampered), auth.FORGED),
        Bad("never-enrolled node", intruder_up,
            encode_envelope(heartbeat("intruder"), intruder, intruder_up), auth.UNKNOWN_NODE)]


def enrolled_outsider(run: str, signer: Signer, seq: int) -> list[Bad]:
    """An enrolled node that runs no agent of this run: authentic, so refused by the run's own
    checks. It says hello in between (not bad in itself) so its tensors reach the content checks."""
    up = protocol.topic_up(run, signer.sender)

    def signed(env: Envelope) -> bytes:
        env.seq = next(counter)
        return encode_envelope(env, signer, up)

    def beat(run_id: str = run) -> Envelope:
        return Envelope(MessageKind.HEARTBEAT, run_id, signer.sender)

    counter = itertools.count(seq)
    return [
        Bad("another run's message", up, signed(beat("other-run")), auth.WRONG_RUN),
        Bad("not in the run", up, signed(beat()), "unknown_agent"),
        Bad("hello", up, signed(Envelope(MessageKind.HELLO, run, signer.sender)), ""),
        Bad("activation of the wrong width", up,
            signed(activation(run, signer.sender, torch.zeros(2, 4, HIDDEN + 3))), "bad_shape"),
        Bad("NaN activation", up,
            signed(activation(run, signer.sender, torch.full((2, 4, HIDDEN), float("nan")))), "non_finite")]


def campaign(fed: Federation, broker: BrokerProcess) -> tuple[list[Bad], dict[str, int]]:
    """Start `fed` (signed), and once round 1 is under way send every kind above; returns what
    was sent (`reason` "" for the one that is not bad) and the status's refusals just before
    (agents' first heartbeats can beat their welcome: unknown_agent). Enrolls "mallory" first
    (the coordinator holds its key; nobody runs it) and takes it offline at the end, as a
    crashed node would."""
    run = fed.settings.runtime.run_id
    mallory_key = auth.new_node_key()
    fed.keys = dataclasses.replace(fed.keys, node_keys={**fed.keys.node_keys, "mallory": mallory_key})
    captured: list[tuple[str, bytes]] = []

    def genuine_activation() -> tuple[str, bytes, Envelope] | None:
        return first_activation(captured)

    with mqtt_client(broker, "eve", subscribe=[protocol.topic_all_up(run)],
                     on_message=lambda c, u, msg: captured.append((msg.topic, bytes(msg.payload)))) as eve:
        fed.start()
        wait_for(in_round(fed, 1, 3), 180, "round 1 under way", fed)
        topic, genuine, env = wait_for(genuine_activation, 30, "a captured activation")
        sent = [*garbage(run), *forgeries(topic, genuine, env.seq + 10**9),
                *enrolled_outsider(run, Signer("mallory", auth.node_key(mallory_key)), 1)]
        before = dict(wait_for(fed.status, 10, "the status").rejected)
        for bad in sent:
            eve.publish(bad.topic, bad.payload, qos=1).wait_for_publish(5)
        eve.publish(protocol.topic_status(run, "mallory"), protocol.STATUS_OFFLINE, qos=1,
                    retain=True).wait_for_publish(5)
    return sent, before


def first_activation(captured: list[tuple[str, bytes]]) -> tuple[str, bytes, Envelope] | None:
    """The first genuine ACTIVATION_UP among captured (topic, payload) pairs, decoded."""
    for topic, payload in list(captured):
        try:
            env = decode_envelope(payload)
        except ProtocolError:
            continue
        if env.kind is MessageKind.ACTIVATION_UP:
            return topic, payload, env
    return None

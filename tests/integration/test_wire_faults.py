"""Bad input on the wire during a real run: each kind is logged, counted by reason in the
coordinator's status, and dropped, and the run's result is exactly what it would have been."""

import itertools
import struct
import zlib

import pytest
import torch

from fsl_edge import protocol
from fsl_edge.protocol import Envelope, MessageKind

from .brokers import mqtt_client
from .runtime_harness import assert_matches_simulation, federation, finish, in_round, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
HIDDEN = 32  # tiny-random-llama


def with_crc(data: bytearray) -> bytes:
    """Re-seal a doctored envelope, so the check under test is reached, not the checksum."""
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return bytes(data)


def activation(run: str, agent: str, hidden: torch.Tensor) -> Envelope:
    env = Envelope(MessageKind.ACTIVATION_UP, run, agent, round=1, step=0)
    B, T = hidden.shape[:2]
    env.add_tensor("hidden", hidden)
    env.add_tensor("attention_mask", torch.ones(B, T, dtype=torch.long))
    env.add_tensor("position_ids", torch.arange(T).expand(B, T).contiguous())
    return env


def test_bad_messages_are_counted_dropped_and_the_run_goes_on(tmp_path, mosquitto_server):
    # unsigned, so that mallory's messages reach the checks under test (with keys they would
    # stop at authentication: tests/integration/test_auth_runtime.py)
    fed = federation(tmp_path, mosquitto_server.url, rounds=2, steps=15, signed=False)
    run = fed.settings.runtime.run_id
    seq = itertools.count(1)

    def encode(env: Envelope) -> bytes:
        env.seq = next(seq)
        return protocol.encode_envelope(env)

    try:
        fed.start()
        wait_for(in_round(fed, 1, 2), 180, "round 1 under way", fed)
        with mqtt_client(mosquitto_server, "mallory") as c:
            def send(agent: str, payload: bytes) -> None:
                c.publish(protocol.topic_up(run, agent), payload, qos=1).wait_for_publish(5)

            send("circulatory", b"not an envelope at all")  # malformed
            wrong_version = bytearray(encode(Envelope(MessageKind.HEARTBEAT, run, "mallory")))
            wrong_version[4] = 99
            send("mallory", with_crc(wrong_version))  # unknown protocol version
            oversize = bytearray(encode(Envelope(MessageKind.HEARTBEAT, run, "mallory")))
            struct.pack_into("<I", oversize, 28, 0xFFFFFFF0)  # declares a 4 GiB meta field
            send("mallory", with_crc(oversize))  # malformed: over the limit
            send("intruder", encode(Envelope(MessageKind.HEARTBEAT, run, "intruder")))  # unknown
            send("mallory", encode(Envelope(MessageKind.HELLO, run, "mallory")))  # joins late
            send("mallory", encode(activation(run, "mallory", torch.zeros(2, 4, HIDDEN + 3))))
            send("mallory", encode(activation(run, "mallory", torch.full((2, 4, HIDDEN), float("nan")))))
            c.publish(protocol.topic_status(run, "mallory"), protocol.STATUS_OFFLINE, qos=1,
                      retain=True).wait_for_publish(5)
        status = finish(fed)
    finally:
        fed.stop()
    assert status.rejected.get("malformed", 0) >= 2, status.rejected
    for reason in ("version", "unknown_agent", "bad_shape", "non_finite"):
        assert status.rejected.get(reason, 0) >= 1, (reason, status.rejected)
    assert all("mallory" not in r.participants for r in status.history)
    assert_matches_simulation(fed)  # none of it touched the training

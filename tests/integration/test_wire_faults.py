"""Bad input on the wire during a real run: each kind is logged, counted by reason in the
coordinator's status, and dropped, and the run's result is exactly what it would have been."""

import itertools

import pytest
import torch

from fsl_edge import protocol
from fsl_edge.protocol import Envelope, MessageKind

from .bad_inputs import HIDDEN, activation, garbage
from .brokers import mqtt_client
from .runtime_harness import assert_matches_simulation, federation, finish, in_round, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


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

            for bad in garbage(run, seq):  # malformed, unknown version, a 4 GiB field declared
                c.publish(bad.topic, bad.payload, qos=1).wait_for_publish(5)
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

"""Bounds against a real Mosquitto: a flooding agent fills only its own queue at the coordinator
(its excess is dropped and counted in /status) while another agent is still served, and
senders of chunked messages that never complete hold no more than the total reassembly bound."""

import os
import time

import pytest
import torch

from fsl_edge import protocol
from fsl_edge.chunking import split_message
from fsl_edge.config import Bounds, RuntimeSettings
from fsl_edge.coordinator.coordinator import Coordinator
from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.models import load
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.transport import MqttLink

from .brokers import mqtt_client
from .runtime_harness import MODEL, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
RUN = "bounds"
KiB, MiB = 1 << 10, 1 << 20


def coordinator_link(url: str, bounds: Bounds) -> MqttLink:
    return MqttLink(url, f"fsl-{RUN}-coordinator",
                    [protocol.topic_all_up(RUN), protocol.topic_all_status(RUN)], bounds=bounds)


def test_a_flooding_agent_is_dropped_and_counted_while_another_is_served(tmp_path, mosquitto_server):
    bounds = Bounds(inbox_per_sender=8)
    settings = CoordinatorSettings(model=MODEL, checkpoint_dir=tmp_path / "checkpoints",
                                   runtime=RuntimeSettings(run_id=RUN, broker=mosquitto_server.url,
                                                           bounds=bounds))
    link = coordinator_link(mosquitto_server.url, bounds)
    alice = MqttLink(mosquitto_server.url, f"fsl-{RUN}-alice", [protocol.topic_down(RUN, "alice")])
    link.start()
    alice.start()
    try:
        coordinator = Coordinator(settings, load(MODEL).model, link)
        # the coordinator is busy (nothing is taken from its queue) while mallory floods it
        with mqtt_client(mosquitto_server, "mallory") as c:
            for seq in range(1, 201):
                env = Envelope(MessageKind.HEARTBEAT, RUN, "mallory", seq=seq)
                info = c.publish(protocol.topic_up(RUN, "mallory"), protocol.encode_envelope(env), qos=1)
            info.wait_for_publish(10)
        alice.publish(protocol.topic_up(RUN, "alice"), Envelope(MessageKind.HELLO, RUN, "alice"))
        wait_for(lambda: link.rejected_counts()["queue_full"] == 192 and link.inbox.queued("alice") == 1,
                 30, "the flood to be dropped past mallory's 8 queued messages")
        assert link.inbox.queued("mallory") == 8
        handled = []
        while (received := link.get(0.5)) is not None:
            handled.append(received.topic.agent)
            coordinator.handle(received)
        assert handled.index("alice") <= 1, handled  # served in turn, not behind the flood
        coordinator.publish_status()
        assert coordinator.published.rejected["queue_full"] == 192
        assert coordinator.published.rejected["unknown_agent"] == 8  # never said hello
        assert "alice" in coordinator.welcomed and "mallory" not in coordinator.welcomed
        welcome = alice.get(10)
        assert welcome is not None and welcome.envelope.kind is MessageKind.HELLO
    finally:
        alice.stop()
        link.stop()


def test_chunk_floods_from_many_senders_hold_no_more_than_the_total(mosquitto_server):
    bounds = Bounds(reassembly_bytes=1 * MiB, reassembly_per_sender=1 * MiB)
    link = coordinator_link(mosquitto_server.url, bounds)
    alice = MqttLink(mosquitto_server.url, f"fsl-{RUN}-alice", [], max_packet=64 * KiB)
    link.start()
    alice.start()
    try:
        with mqtt_client(mosquitto_server, "mallory") as c:
            for i in range(8):  # first chunks of 400 KiB messages whose other chunks never come
                chunk = split_message(os.urandom(400 * KiB), max_packet=64 * KiB)[0]
                info = c.publish(protocol.topic_up(RUN, f"mallory{i}"), chunk, qos=1)
            info.wait_for_publish(10)
        wait_for(lambda: link.rejected_counts()["overflow"] == 6, 30, "6 of 8 floods refused")
        assert link._reassembler.buffered_bytes() <= 1 * MiB
        env = Envelope(MessageKind.HEARTBEAT, RUN, "alice")
        # 300 KiB, chunked: the two floods let in hold 800 KiB, so it fits only by evicting one
        env.add_tensor("payload", torch.arange(75_000, dtype=torch.float32))
        alice.publish(protocol.topic_up(RUN, "alice"), env)
        deadline, got = time.monotonic() + 30, None
        while got is None and time.monotonic() < deadline:
            got = link.get(0.5)
        assert got is not None and got.topic.agent == "alice"  # a flooder's message made room
        assert torch.equal(got.envelope.tensor("payload"), torch.arange(75_000, dtype=torch.float32))
        assert link.rejected_counts()["evicted"] == 1
        assert link._reassembler.buffered_bytes() <= 1 * MiB
    finally:
        alice.stop()
        link.stop()

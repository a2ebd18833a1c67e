"""Tensors of several MiB cross real brokers in chunks and come out bit-identical."""

from __future__ import annotations

import queue
import random
import threading

import pytest
import torch

from fsl_edge import protocol
from fsl_edge.chunking import Reassembler, split_message
from fsl_edge.errors import ProtocolError
from fsl_edge.protocol import Envelope, MessageKind, decode_envelope, encode_envelope

from .brokers import BrokerProcess, mqtt_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

RUN, AGENT = "itest", "site-a"
MAX_PACKET = 1 << 20
WAIT_S = 30.0


def big_envelope() -> tuple[Envelope, torch.Tensor]:
    hidden = torch.randn(4, 512, 768, generator=torch.Generator().manual_seed(1))  # (B, T, C): 6 MiB fp32
    env = Envelope(MessageKind.ACTIVATION_UP, RUN, AGENT, round=1, step=2, seq=3, meta={"tokens": 2048})
    env.add_tensor("hidden", hidden, ("raw", "shuffle", "zstd"))
    return env, hidden


class Receiver:
    """Feeds every packet on the up topics to a Reassembler; completed messages land in a queue."""

    def __init__(self):
        self.reassembler = Reassembler(deadline_s=WAIT_S)
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.errors: list[ProtocolError] = []

    def on_message(self, client, userdata, msg) -> None:
        sender = protocol.parse_topic(msg.topic).agent
        try:
            message = self.reassembler.feed(sender, msg.payload)
        except ProtocolError as e:  # never raise in paho's network thread
            self.errors.append(e)
            return
        if message is not None:
            self.messages.put(bytes(message))


def publish_all(client, topic: str, packets: list[bytes]) -> None:
    infos = [client.publish(topic, p, qos=protocol.QOS) for p in packets]
    for info in infos:
        info.wait_for_publish(timeout=WAIT_S)  # QoS 1: returns on PUBACK
        assert info.is_published(), f"no PUBACK within {WAIT_S} s"


@pytest.mark.parametrize("broker_fixture", ["mosquitto_1mib", "amqtt_server"])
def test_several_mib_tensor_crosses_the_broker_in_chunks(request, broker_fixture):
    broker: BrokerProcess = request.getfixturevalue(broker_fixture)
    env, hidden = big_envelope()
    message = encode_envelope(env)
    packets = split_message(message, max_packet=MAX_PACKET)
    assert len(message) > 5 * MAX_PACKET and len(packets) >= 6

    rx = Receiver()
    with mqtt_client(broker, "coordinator", subscribe=[protocol.topic_all_up(RUN)], on_message=rx.on_message), \
         mqtt_client(broker, AGENT) as tx:
        publish_all(tx, protocol.topic_up(RUN, AGENT), packets)
        received = rx.messages.get(timeout=WAIT_S)

    assert received == message  # bit-identical bytes
    out = decode_envelope(received)
    assert (out.kind, out.round, out.step, out.seq, out.meta) == (MessageKind.ACTIVATION_UP, 1, 2, 3, {"tokens": 2048})
    assert torch.equal(out.tensor("hidden"), hidden)
    assert rx.errors == [] and rx.reassembler.pending() == 0


def test_duplicated_and_reordered_chunks_reassemble_once_across_mosquitto(mosquitto_1mib):
    env, _ = big_envelope()
    message = encode_envelope(env)
    packets = split_message(message, max_packet=MAX_PACKET)
    stream = packets + packets[::2]  # what QoS-1 redelivery after a reconnect looks like
    random.Random(3).shuffle(stream)

    rx = Receiver()
    with mqtt_client(mosquitto_1mib, "coordinator", subscribe=[protocol.topic_all_up(RUN)], on_message=rx.on_message), \
         mqtt_client(mosquitto_1mib, AGENT) as tx:
        publish_all(tx, protocol.topic_up(RUN, AGENT), stream)
        assert rx.messages.get(timeout=WAIT_S) == message
        # The duplicates published after completion must not produce a second copy.
        publish_all(tx, protocol.topic_up(RUN, AGENT), [packets[0]])
        with pytest.raises(queue.Empty):
            rx.messages.get(timeout=1.0)

    assert rx.reassembler.stats["completed"] == 1 and rx.reassembler.stats["duplicate"] >= 1
    assert rx.errors == []


def test_unchunked_message_over_the_packet_limit_never_arrives(mosquitto_1mib):
    """The control: without chunking, Mosquitto drops the client instead of delivering."""
    rx = Receiver()
    dropped = threading.Event()
    with mqtt_client(mosquitto_1mib, "coordinator", subscribe=[protocol.topic_all_up(RUN)], on_message=rx.on_message), \
         mqtt_client(mosquitto_1mib, AGENT) as tx:
        tx.on_disconnect = lambda c, userdata, flags, reason_code, properties: dropped.set()
        tx.reconnect_delay_set(min_delay=30, max_delay=30)  # keep paho from resending in a loop meanwhile
        tx.publish(protocol.topic_up(RUN, AGENT), bytes(2 * MAX_PACKET), qos=protocol.QOS)
        assert dropped.wait(10.0), "Mosquitto accepted a packet over max_packet_size"
        with pytest.raises(queue.Empty):
            rx.messages.get(timeout=1.0)

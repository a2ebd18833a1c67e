"""Real MQTT brokers for tests and benchmarks (from fsl_edge.broker), plus a connected paho
client. Kept free of pytest so bench/ can use it too."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fsl_edge import protocol
from fsl_edge.broker import (BrokerProcess, amqtt_broker, find_mosquitto, free_port,  # noqa: F401
                              mosquitto_broker)


@contextlib.contextmanager
def mqtt_client(
    broker: BrokerProcess,
    client_id: str,
    *,
    subscribe: Sequence[str] = (),
    on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None,
    timeout: float = 10.0,
) -> Iterator[mqtt.Client]:
    """A paho 2 client (MQTT 3.1.1, QoS 1) connected and subscribed before the body runs."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    connected, subscribed = threading.Event(), threading.Event()
    refused: list[object] = []

    def on_connect(c, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            connected.set()

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        # Raising here would kill paho's network thread; report to the waiting caller instead.
        refused.extend(rc for rc in reason_codes if rc.is_failure)
        subscribed.set()

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    if on_message is not None:
        client.on_message = on_message
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise TimeoutError(f"no CONNACK from {broker.name} at {broker.url} within {timeout} s")
        if subscribe:
            client.subscribe([(topic, protocol.QOS) for topic in subscribe])  # one SUBACK for all
            if not subscribed.wait(timeout):
                raise TimeoutError(f"no SUBACK from {broker.name} for {list(subscribe)} within {timeout} s")
            if refused:
                raise RuntimeError(f"{broker.name} refused subscribing to {list(subscribe)}: {refused}")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()

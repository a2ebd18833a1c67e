"""Fixtures that start real brokers on free loopback ports and stop them at teardown.

A missing Mosquitto fails the tests with the fix in the message instead of skipping them: a
skipped broker test is a test that silently stopped guarding anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .brokers import BrokerProcess, amqtt_broker, mosquitto_broker
from .kube_emulator import kube  # noqa: F401 - the Kubernetes API emulator, for every test here


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start Mosquittos with custom settings: factory(max_packet_size=None, port=None)."""
    started: list[BrokerProcess] = []

    def start(**settings) -> BrokerProcess:
        try:
            broker = mosquitto_broker(tmp_path, **settings)
        except FileNotFoundError as e:
            pytest.fail(str(e), pytrace=False)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto_server(mosquitto_factory) -> BrokerProcess:
    """A Mosquitto with default settings."""
    return mosquitto_factory()


@pytest.fixture
def mosquitto_1mib(mosquitto_factory) -> BrokerProcess:
    """A Mosquitto refusing packets over 1 MiB, like EMQX's default."""
    return mosquitto_factory(max_packet_size=1 << 20)


@pytest.fixture
def amqtt_server(tmp_path: Path) -> Iterator[BrokerProcess]:
    """The embedded pure-Python broker, in a child process."""
    with amqtt_broker(tmp_path) as broker:
        yield broker

"""The link probe against a real Mosquitto: on loopback, and through a link shaped to a known
rate and RTT (skipped, with the reason, where network namespaces cannot be made)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fsl_edge.profile import ProfileSettings, measure_link, profile_node
from fsl_edge.tiny import tiny_model

from .brokers import mosquitto_broker
from .test_netshape import link_or_skip

pytestmark = pytest.mark.integration
TOPIC = "fsl/probe-test/agent/site-1/probe"  # any topic the node may read and write


def test_loopback_is_fast_and_close(mosquitto_server):
    up, down, rtt = measure_link(mosquitto_server.url, TOPIC, repeats=2)
    assert up > 10e6 and down > 10e6, (up, down)  # loopback moves far more than 10 MB/s
    assert 0 <= rtt < 0.05


def test_a_profile_measures_the_model_and_the_link(mosquitto_server):
    settings = ProfileSettings(batch=2, seq=16, repeats=2, probe_large=64 << 10)
    profile = profile_node(tiny_model("llama"), mosquitto_server.url, TOPIC, settings,
                           model_name="tiny-random-llama")
    assert profile.device_kind == "cpu" and profile.memory_bytes > 0
    assert profile.block_s > 0 and profile.ref_tokens == 32
    assert profile.up_bytes_per_s > 0 and profile.down_bytes_per_s > 0
    assert profile.model == "tiny-random-llama" and profile.measured_at > 0


# Runs in the shaped namespace: the probe as an agent there would run it.
PROBE = """
import json, sys
from fsl_edge.profile import measure_link
print(json.dumps(measure_link(sys.argv[1], sys.argv[2], repeats=3)))
"""


@pytest.mark.slow  # about 10 s: namespace set-up and 256 KiB messages at 20 Mbit/s
def test_the_probe_reads_a_shaped_link(tmp_path):
    rate_mbit, rtt_ms = 20.0, 50.0
    with link_or_skip(rate_mbit=rate_mbit, rtt_ms=rtt_ms) as link:
        broker = mosquitto_broker(tmp_path, host=link.bind_host).start()
        try:
            done = subprocess.run(link.wrap([sys.executable, "-c", PROBE, link.broker_url(broker.port), TOPIC]),
                                  capture_output=True, text=True, timeout=120)
        finally:
            broker.stop()
    assert done.returncode == 0, done.stderr
    up, down, rtt = json.loads(done.stdout)
    rate = rate_mbit * 1e6 / 8
    for name, measured in (("up", up), ("down", down)):
        assert 0.8 * rate <= measured <= 1.2 * rate, f"{name} {measured * 8 / 1e6:.1f} Mbit/s on a {rate_mbit} Mbit/s link"
    assert rtt_ms - 5 <= rtt * 1000 <= 2 * rtt_ms, f"rtt {rtt * 1000:.1f} ms on a {rtt_ms} ms link"

"""The distributed runtime, end to end: real processes, a real broker, real faults.

Each run's final adapters are compared with the in-process simulation of the same run: the
split server's fixed order and the agents' replay make them equal bit for bit, so "nothing lost
or applied twice" is checked on the numbers themselves, not on log lines.
"""

import pytest

from fsl_edge.config import PrefixSettings, SelectionSettings, SplitMode

from . import faults
from .runtime_harness import run_to_end, assert_matches_simulation, assert_on_the_ledger, federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_two_agents_two_rounds_on_mosquitto_equal_the_simulation(tmp_path, mosquitto_server):
    fed = federation(tmp_path, mosquitto_server.url)
    status = run_to_end(fed)
    assert status.state == "finished" and len(status.history) == 2
    assert all(r.participants == sorted(fed.sites) for r in status.history)
    assert status.traffic["activation_up"].messages == 2 * 2 * 3
    assert_matches_simulation(fed)
    assert_on_the_ledger(fed, rounds=2)


def test_a_compressed_run_equals_the_compressed_simulation(tmp_path, mosquitto_server):
    # int4 steps, top-k adapter deltas with error feedback both ways: over three rounds the
    # download goes full, then delta, then delta carrying the previous round's residual
    fed = federation(tmp_path, mosquitto_server.url, rounds=3, compression="balanced")
    status = run_to_end(fed)
    assert status.state == "finished" and len(status.history) == 3
    for kind in ("activation_up", "activation_down", "gradient_up", "gradient_down"):
        t = status.traffic[kind]
        assert t.raw_bytes > 3 * t.bytes, (kind, t)
    # byte accounting per round: every round moved compressed bytes, and the rounds add up to
    # no more than the run's total (HELLOs and the last ROUND_END fall between rounds)
    assert all(r.raw_bytes > 3 * r.wire_bytes > 0 for r in status.history)
    for kind, t in status.traffic.items():
        assert sum(r.traffic[kind].bytes for r in status.history if kind in r.traffic) <= t.bytes
    # the tiny model's adapter tensors are so small that their names weigh as much as their values
    assert status.traffic["adapter_up"].bytes < status.traffic["adapter_up"].raw_bytes
    assert_matches_simulation(fed)


def test_a_cached_prefix_with_keys_and_layer_selection_equals_the_simulation(tmp_path, mosquitto_server):
    # 8 samples a site, batch 4: 2 steps an epoch, 6 epochs
    fed = federation(tmp_path, mosquitto_server.url, rounds=3, steps=4, per_site=8,
                     prefix=PrefixSettings(frozen=2, send_keys=True, backend="onnxruntime"),
                     selection=SelectionSettings(policy="topk-gradnorm", fraction=0.5))
    status = run_to_end(fed)
    assert status.state == "finished"
    for name, agent in status.agents.items():
        # from its second epoch on every sample comes from the agent's cache
        assert agent.cache["hit_rate"] >= 0.8 and agent.cache["misses"] == 8, (name, agent.cache)
        assert [e for e, _ in agent.layers][-1] == 5 and all(len(c) == 1 for e, c in agent.layers if e)
    assert status.layers and status.layers[-1][0] >= 5
    store = status.prefix_store
    assert store["hits"] == 2 * 8 * 5 and store["misses"] == 0 and store["entries"] == 16, store
    # keys instead of activations: later rounds send far less up than the first
    ups = [r.traffic["activation_up"].bytes for r in status.history]
    assert ups[2] < ups[0] / 2, ups
    assert "gradient_down" in status.traffic and status.traffic["gradient_down"].raw_bytes == 0
    assert_matches_simulation(fed)


def test_vanilla_sites_that_train_nothing_send_keys_and_equal_the_simulation(tmp_path, mosquitto_server):
    # the activation-caching report's design: every site block frozen, the server trains
    fed = federation(tmp_path, mosquitto_server.url, mode=SplitMode.VANILLA, rounds=2, steps=4,
                     per_site=8, prefix=PrefixSettings(frozen=2, send_keys=True, backend="torch"))
    status = run_to_end(fed)
    assert status.state == "finished"
    ups = [r.traffic["activation_up"] for r in status.history]
    assert ups[1].raw_bytes < ups[0].raw_bytes / 2, ups  # round 2: keys only
    assert status.traffic["adapter_up"].raw_bytes == 0  # nothing to federate at the sites
    assert_matches_simulation(fed)


def test_vanilla_mode_on_the_embedded_broker_equals_the_simulation(tmp_path, amqtt_server):
    fed = federation(tmp_path, amqtt_server.url, mode=SplitMode.VANILLA)
    status = run_to_end(fed)
    assert status.state == "finished"
    assert "activation_down" not in status.traffic  # vanilla: one round trip per step
    assert_matches_simulation(fed)


def test_coordinator_killed_mid_round_resumes_from_its_checkpoint(tmp_path, mosquitto_server):
    # with a frozen prefix whose activations the server keeps (keys instead of activations) and
    # layer selection: the new coordinator holds no copies, and its trunk's selection comes
    # back from the checkpoint
    out = faults.coordinator_killed(tmp_path, mosquitto_server)
    fed, status = out.fed, out.status
    assert [r.round for r in status.history] == [1, 2, 3]
    # the registry came back from the checkpoint: contributions before the crash still count
    assert sum(a.tokens for a in status.agents.values()) == sum(r.tokens for r in status.history)
    assert all(a.rounds_contributed == 3 for a in status.agents.values())
    # the agents' keys named copies the new coordinator did not have: they sent them again
    assert any("sending them" in log.read_text() for log in (fed.workdir / "logs").glob("agent-*.log"))
    # the agents rewound to the start of round 2 and replayed it: the result is the same
    assert_matches_simulation(fed)
    # and the ledger holds each round once, the restart recorded, the checkpoints matching
    assert_on_the_ledger(fed, rounds=3)


def test_broker_restarted_mid_run_loses_nothing(tmp_path, mosquitto_factory):
    out = faults.broker_restarted(tmp_path, mosquitto_factory())
    fed, status = out.fed, out.status
    assert status.state == "finished"
    # the fault really hit every process: each lost its connection and got it back
    for log in (fed.workdir / "logs").glob("*.log"):
        assert "reconnected to" in log.read_text(), log.name
    assert_matches_simulation(fed)


def test_agent_killed_mid_round_round_closes_on_quorum_and_agent_rejoins(tmp_path, mosquitto_server):
    out = faults.agent_killed(tmp_path, mosquitto_server)
    status = out.status
    rounds = {r.round: r.participants for r in status.history}
    assert sorted(rounds) == list(range(1, 11))
    assert rounds[1] == ["circulatory", "neoplasms"]  # closed without the dead agent
    assert any("injury" in p for r, p in rounds.items() if r > 1)  # it came back
    for agent, st in status.agents.items():  # each contribution counted once
        assert st.rounds_contributed == sum(agent in p for p in rounds.values())
    assert sum(r.tokens for r in status.history) == sum(a.tokens for a in status.agents.values())
    books = faults.books(out.fed, status)  # every round an agent finished was averaged in, once
    assert not books.lost and not books.unexplained and not books.twice, books

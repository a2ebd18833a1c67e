"""Agents at different cuts and LoRA ranks, end to end through a real Mosquitto: the run
finishes and its adapters equal the in-process simulation of the same pinned fleet; with the
planner on, each agent trains at the cut and rank planned from the profiles they measured."""

import re

import pytest

from fsl_edge.config import PlannerSettings

from .runtime_harness import run_to_end, assert_matches_simulation, federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

SITES = ("circulatory", "injury", "neoplasms")
# tiny llama, 6 blocks: site blocks 0 | 5, 0-1 | 5, 0-2 | 4-5; ranks 2, 4 (the trunk's), 8
PINS = {"circulatory": {"front": 1, "back": 1, "rank": 2},
        "injury": {"front": 2, "back": 1, "rank": 4},
        "neoplasms": {"front": 3, "back": 2, "rank": 8}}


def test_three_agents_at_pinned_cuts_and_ranks_equal_the_simulation(tmp_path, mosquitto_server):
    fed = federation(tmp_path, mosquitto_server.url, sites=SITES, rounds=2, steps=2,
                     planner=PlannerSettings(pins=PINS))
    status = run_to_end(fed)
    assert status.state == "finished" and len(status.history) == 2
    assert all(r.participants == sorted(SITES) for r in status.history)
    assert_matches_simulation(fed)


def test_the_planner_plans_from_measured_profiles_and_each_agent_trains_its_choice(
        tmp_path, mosquitto_server):
    # one node pinned to the least work, so the fleet is mixed whatever this machine measures
    pins = {"circulatory": PINS["circulatory"]}
    fed = federation(tmp_path, mosquitto_server.url, sites=SITES, rounds=2, steps=2,
                     planner=PlannerSettings(enabled=True, ranks=(2, 4, 8), pins=pins,
                                             relink_every=1))
    status = run_to_end(fed)
    assert status.state == "finished" and len(status.history) == 2
    assert all(r.participants == sorted(SITES) for r in status.history)
    assert "bad_profile" not in status.rejected
    planner = status.planner
    assert planner is not None and set(planner["nodes"]) == set(SITES)
    assert planner["nodes"]["circulatory"] | {"a": 1, "b": 5, "rank": 2, "pinned": True} \
        == planner["nodes"]["circulatory"]
    for name, choice in planner["nodes"].items():
        assert choice["step_s"] > 0 and choice["measured_step_s"] > 0  # predicted, measured
        log = (fed.workdir / "logs" / f"agent-{name}.log").read_text()
        assert "profiled: block" in log  # measured for real: its model and its link
        # and its link again after each round (relink_every=1), reported with the next upload
        assert choice["link"]["measured_at"] > choice["planned_link"]["measured_at"] > 0
        assert "link now up" in log
        assert re.search(rf"cut {choice['a']}/{choice['b']} \(u-shape\), rank {choice['rank']} "
                         r"\(planned\)", log), log[-2000:]

"""Agents at different cuts and LoRA ranks, end to end through a real Mosquitto: the run
finishes and its adapters equal the in-process simulation of the same pinned fleet."""

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

"""Load: 32 agents against one coordinator through a real Mosquitto on loopback. Every step is
applied exactly once on both sides of the split, every round's upload is counted once in
/status and on the ledger, nothing is dropped by a bound, and the coordinator's memory levels
off instead of growing with the steps. bench/load.py runs the 32 x 100-step version and writes
its figures to BENCHMARKS.md; the agents' threads are explained in load_harness."""

import pytest

from .load_harness import LoadRun, account, run_load
from .runtime_harness import assert_matches_simulation

pytestmark = pytest.mark.integration
AGENTS = 32
BOUNDS = ("overflow", "evicted", "queue_full", "overload")
# Peak RSS of the last quarter of training over that of the first: generous, because the
# allocator still settles early on; memory that grows with the steps exceeds it over 100 steps.
PLATEAU = 1.25


def check(run: LoadRun) -> None:
    books = account(run)
    assert not books.problems, books.problems[:10]
    assert (books.lost, books.duplicated) == (0, 0)
    assert not {r: n for r, n in run.status.rejected.items() if r in BOUNDS}, run.status.rejected
    quarters = run.quarters()
    assert all(quarters), f"too few RSS samples: {run.rss}"
    assert quarters[3] <= PLATEAU * quarters[0], f"coordinator RSS grew: {quarters}"


@pytest.mark.timeout(240)
def test_32_agents_a_few_steps_lose_and_repeat_nothing(tmp_path, mosquitto_server):
    run = run_load(tmp_path, mosquitto_server.url, AGENTS, rounds=2, steps=2, timeout=180)
    check(run)
    assert_matches_simulation(run.fed)  # the same result as 32 sites trained in-process


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_32_agents_100_steps_each(tmp_path, mosquitto_server):
    run = run_load(tmp_path, mosquitto_server.url, AGENTS, rounds=10, steps=10, timeout=1000)
    check(run)

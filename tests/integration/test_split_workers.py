"""Split-server workers (training.split.server 'per-site', SplitFed-V1), end to end: two worker
processes share three agents through Mosquitto's shared subscription; the run equals the
in-process simulation of the same rule (a trunk copy per site, averaged by tokens) bit for bit,
whichever worker served which site."""

import pytest

from fsl_edge.config import ServerCopies, SplitMode, SplitSettings

from .runtime_harness import assert_matches_simulation, assert_on_the_ledger, federation, run_to_end

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

SITES = ("circulatory", "injury", "neoplasms")


@pytest.mark.parametrize("mode", [SplitMode.U_SHAPE,
                                  pytest.param(SplitMode.VANILLA, marks=pytest.mark.slow)])
def test_two_workers_three_agents_equal_the_per_site_simulation(tmp_path, mosquitto_server, mode):
    fed = federation(tmp_path, mosquitto_server.url, sites=SITES, rounds=2, steps=3, mode=mode,
                     split=SplitSettings(mode=mode, server=ServerCopies.PER_SITE))
    fed.workers = 2
    status = run_to_end(fed)
    assert status.state == "finished" and len(status.history) == 2
    assert all(r.participants == sorted(SITES) for r in status.history)
    # every site's copy came from a worker, each round; no step went to the coordinator
    assert sum(w.copies for w in status.workers.values()) == 2 * len(SITES)
    assert set(status.workers) <= {"w0", "w1"}
    assert "activation_up" not in status.traffic
    assert_matches_simulation(fed)
    assert_on_the_ledger(fed, rounds=2)
    served = [int(p.read_text().split("worker served ")[1].split()[0])
              for p in sorted((fed.workdir / "logs").glob("worker-*.log"))]
    assert sum(served) == 2 * 3 * len(SITES), served

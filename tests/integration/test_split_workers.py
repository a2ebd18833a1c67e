"""Split-server workers (training.split.server 'per-site', SplitFed-V1), end to end: two worker
processes share three agents through Mosquitto's shared subscription; the run equals the
in-process simulation of the same rule (a trunk copy per site, averaged by tokens) bit for bit,
whichever worker served which site."""

import signal
import time

import pytest

from fsl_edge.config import ServerCopies, SplitMode, SplitSettings

from .runtime_harness import (assert_matches_simulation, assert_on_the_ledger, federation, finish,
                              run_to_end, wait_for)

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
    # no step went to the coordinator, yet its status counts them, as the workers saw them
    assert status.traffic["activation_up"].messages >= 2 * 3 * len(SITES)
    assert status.traffic["gradient_down"].messages >= 2 * 3 * len(SITES)
    assert all(status.agents[s].traffic["activation_up"].bytes > 0 for s in SITES)
    assert_matches_simulation(fed)
    assert_on_the_ledger(fed, rounds=2)
    served = [int(p.read_text().split("worker served ")[1].split()[0])
              for p in sorted((fed.workdir / "logs").glob("worker-*.log"))]
    assert sum(served) == 2 * 3 * len(SITES), served


@pytest.mark.slow
def test_a_worker_killed_mid_round_its_sites_start_the_round_over_on_the_other(tmp_path, mosquitto_server):
    # what a scale-down of the workers' autoscaler does: the killed worker's sites notice its
    # silence (runtime.worker_lost_s), rewind their round and send its first step to the shared
    # subscription again; the new copies see the same batches from the same trunk, so the run
    # still equals the simulation bit for bit
    fed = federation(tmp_path, mosquitto_server.url, sites=SITES, rounds=2, steps=40,
                     split=SplitSettings(server=ServerCopies.PER_SITE))
    fed.settings = fed.settings.model_copy(update={"runtime": fed.settings.runtime.model_copy(
        update={"worker_lost_s": 4.0})})
    fed.workers = 2
    try:
        fed.start()
        victim = wait_for(lambda: next((n for n in ("worker-w0", "worker-w1")
                                        if served_sites(fed, n)), None), 240,
                          "a worker serving a site", fed)
        time.sleep(0.3)  # its site has the first answer (it sends the rest there), not all 40
        worker = fed.processes.pop(victim)
        worker.send_signal(signal.SIGSTOP)  # at once, mid-round: then gone for good
        worker.kill()
        worker.wait()
        status = finish(fed)
    finally:
        fed.stop()
    assert status.state == "finished" and all(r.participants == sorted(SITES) for r in status.history)
    assert set(status.workers) == {"w0", "w1"}
    assert_matches_simulation(fed)
    logs = "".join(p.read_text() for p in (fed.workdir / "logs").glob("agent-*.log"))
    assert "starts over on another" in logs
    survivor = ({"worker-w0", "worker-w1"} - {victim}).pop()
    assert served_sites(fed, victim) <= served_sites(fed, survivor)


def served_sites(fed, name: str) -> set[str]:
    """The sites a worker has answered so far, from its log."""
    log = fed.workdir / "logs" / f"{name}.log"
    return {line.split(" serves ")[1].split()[0] for line in log.read_text().splitlines()
            if " serves " in line} if log.exists() else set()


@pytest.mark.slow
def test_up_with_workers_runs_a_per_site_federation(tmp_path, capsys):
    from fsl_edge.cli.app import main
    from fsl_edge.icd10_data import build_icd10

    build_icd10(tmp_path / "data", chapters=SITES[:2], per_site=8, heldout=2)
    assert main(["up", "--model", "tiny-random-llama", "--rounds", "1", "--steps", "2",
                 "--agents", "2", "--workers", "2", "--eval-samples", "2",
                 "--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "up")]) == 0
    assert "2 split-server workers" in capsys.readouterr().out
    served = "".join(p.read_text() for p in (tmp_path / "up" / "logs").glob("worker-*.log"))
    assert served.count(" serves ") >= 2

"""A real federation for tests: coordinator and agents as processes against a test broker, plus
the in-process simulation of the same run to compare the result with."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fsl_edge.cli.federation import Federation, prepare
from fsl_edge.config import CompressionSettings, LoraSettings, RuntimeSettings, SplitMode, SplitSettings, TrainSettings
from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.data import pad_id_of
from fsl_edge.evaluate import load_result
from fsl_edge.icd10_data import build_icd10
from fsl_edge.models import load
from fsl_edge.config import LearningSettings
from fsl_edge.simulation import simulate
from fsl_edge.sites import load_sites
from fsl_edge.status import Status

MODEL = "tiny-random-llama"
SITES = ("circulatory", "neoplasms")


def federation(tmp_path: Path, broker_url: str, sites=SITES, rounds: int = 2, steps: int = 3,
               mode: SplitMode = SplitMode.U_SHAPE, min_agents: int | None = None,
               run_id: str = "test", compression: str = "lossless", per_site: int = 40,
               signed: bool = True, **learning) -> Federation:
    """`learning`: further LearningSettings fields (prefix, selection). `signed`: messages are
    signed and checked (keys made for the run), as `fsl-edge up` does."""
    data = tmp_path / "data"
    if not (data / "manifest.json").exists():
        build_icd10(data, chapters=sites, per_site=per_site, heldout=4)
    training = LearningSettings(
        split=learning.pop("split", SplitSettings(mode=mode)), lora=LoraSettings(rank=4),
        train=TrainSettings(rounds=rounds, steps=steps, batch_size=4, max_len=32, lr=1e-2),
        compression=CompressionSettings(preset=compression), **learning)
    settings = CoordinatorSettings(
        model=MODEL, training=training, status_port=0,
        runtime=RuntimeSettings(run_id=run_id, broker=broker_url, heartbeat_s=0.5,
                                offline_after_s=8.0, resend_s=2.0))
    fed = prepare(tmp_path / "fed", settings, sorted(sites), data, broker_url, embedded=False,
                  signed=signed)
    if min_agents is not None:
        fed.settings = fed.settings.model_copy(update={"min_agents": min_agents})
    return fed


def wait_for(predicate, timeout: float, what: str, fed: Federation | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fed is not None:
            fed.check()
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    logs = ""
    if fed is not None:
        for log in sorted((fed.workdir / "logs").glob("*.log")):
            logs += f"\n--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:])
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{logs}")


def in_round(fed: Federation, round_: int, step: int):
    """A predicate: the coordinator is in `round_` and some agent reached `step`."""
    def check():
        s = fed.status()
        return s is not None and s.round == round_ and s.state == "training" and \
            any(a.step >= step and a.round == round_ for a in s.agents.values())
    return check


def run_to_end(fed: Federation, timeout: float = 240) -> Status:
    """Start the federation, let it finish (`finish`), stop whatever is left either way."""
    try:
        fed.start()
        return finish(fed, timeout)
    finally:
        fed.stop()


def finish(fed: Federation, timeout: float = 240) -> Status:
    """Wait for the coordinator to finish, every agent to exit cleanly; return the last status."""
    wait_for(fed.coordinator_done, timeout, "the coordinator to finish", fed)
    fed.wait(60)
    fed.check()
    codes = {name: p.returncode for name, p in fed.processes.items()}
    assert all(c == 0 for c in codes.values()), codes
    return Status.model_validate(json.loads((fed.checkpoint_dir / "status.json").read_text()))


def final_and_simulated(fed: Federation) -> list[tuple[dict, dict]]:
    """(the run's final adapter, the in-process simulation's with the same seeds), for the site
    adapter and the trunk's."""
    latest = fed.checkpoint_dir / (fed.checkpoint_dir / "LATEST").read_text().strip()
    site, server = load_result(latest)
    loaded = load(fed.settings.model)
    sites = load_sites(fed.data_dir, loaded.tokenizer, fed.settings.training.train.max_len,
                       sorted(fed.sites))
    ref = simulate(loaded.model, sites, fed.settings.training, pad_id_of(loaded.tokenizer))
    return [(site, ref.site_adapter), (server, ref.server_adapter)]


def simulation_gap(fed: Federation) -> float:
    """The largest difference of any adapter value from the simulation's (inf: other tensors)."""
    gap = 0.0
    for mine, theirs in final_and_simulated(fed):
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            return float("inf")
        gap = max([gap, *((mine[k] - theirs[k]).abs().max().item() for k in mine)])
    return gap


def assert_matches_simulation(fed: Federation, atol: float = 0.0) -> None:
    """The run's final adapters equal the in-process simulation's with the same seeds."""
    for mine, theirs in final_and_simulated(fed):
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.allclose(mine[k], theirs[k], rtol=0, atol=atol), \
                f"{k}: max diff {(mine[k] - theirs[k]).abs().max().item()}"


def assert_on_the_ledger(fed: Federation, rounds: int) -> None:
    """`fsl-edge audit verify` on the run's checkpoint folder: the chain is whole, it holds
    `rounds` rounds, and the checkpoints kept match it."""
    from fsl_edge.audit import verify

    report = verify(fed.checkpoint_dir / "ledger.jsonl", fed.checkpoint_dir)
    assert report.ok, report.problems
    assert report.rounds == rounds and report.checkpoints, (report.rounds, report.checkpoints)

"""The rows of the quality protocol for one seed: train each, score each the same way.

Every trained row does the same work: rounds x steps local steps of batch B per site (the
centralised row: as many steps on the union of the sites' data as all sites take together).
Every row is scored as one peft model on the base (for fsl-edge: both adapters, whose logits
equal the split forward's): held-out loss per chapter and over all of them, and exact match by
greedy generation (`fsl_edge.quality`) on the first samples of each chapter's held-out file.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fsl_edge.baselines import lora_model, train_lora
from fsl_edge.config import LearningSettings
from fsl_edge.data import BatchStream, Sample
from fsl_edge.exact_match import exact_matches
from fsl_edge.lora import adapter_state, load_adapter_state
from fsl_edge.quality import greedy, loss_of
from fsl_edge.result import FederationResult, tuned_model
from fsl_edge.simulation import SiteData, eval_batches, heldout_losses, simulate, site_seed


@dataclass
class RowRun:
    """One row on one seed."""

    name: str
    per: dict[str, float]  # held-out loss per chapter
    overall: float
    exact: float | None  # exact-match fraction; None without prompt/completion samples
    seconds: float  # training wall time
    by_kind: dict[str, float] = field(default_factory=dict)  # bytes per site and round by
    # message kind; empty when nothing crosses a network


class Scorer:
    """Held-out loss and exact match of a model, the same for every row."""

    def __init__(self, tokenizer, sites: list[SiteData], samples: dict[str, list[Sample]],
                 batch_size: int, pad_id: int):
        self.tokenizer, self.samples = tokenizer, samples
        self.heldout = {s.name: eval_batches(s.heldout, batch_size, pad_id) for s in sites}

    def __call__(self, name: str, lm: torch.nn.Module, seconds: float,
                 by_kind: dict[str, float] | None = None) -> RowRun:
        lm.eval()
        started = time.perf_counter()
        per, overall = heldout_losses(loss_of(lm), self.heldout)
        generate = greedy(lm, self.tokenizer.eos_token_id)
        hits = total = 0
        for samples in self.samples.values():
            h, n = exact_matches(generate, self.tokenizer, samples)
            hits, total = hits + h, total + n
        run = RowRun(name, per, overall, hits / total if total else None, seconds, by_kind or {})
        print(f"  {name:44s} " + " ".join(f"{k}={v:.4f}" for k, v in per.items())
              + f" all={overall:.4f} em={hits}/{total} (trained in {seconds:.0f} s, scored in "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
        return run


def _timed(train: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, float]:
    started = time.perf_counter()
    lm = train()
    return lm, time.perf_counter() - started


def fsl_edge(model: torch.nn.Module, spec: str, sites: list[SiteData], settings: LearningSettings,
             pad_id: int, score: Scorer, name: str) -> RowRun:
    """The federation in process (`simulate`); bytes per round from its per-kind accounting."""
    started = time.perf_counter()
    result = simulate(model, [SiteData(s.name, s.train, []) for s in sites], settings, pad_id)
    seconds = time.perf_counter() - started
    trained = result.rounds[1:]
    sent = {k: statistics.fmean(r.bytes[k] for r in trained) / len(sites) for k in trained[0].bytes}
    lm = tuned_model(model, FederationResult(Path("(in memory)"), spec, settings,
                                             result.site_adapter, result.server_adapter))
    return score(name, lm, seconds, sent)


def centralised(model, sites: list[SiteData], settings: LearningSettings, pad_id: int,
                score: Scorer) -> RowRun:
    train = settings.train
    union = [e for s in sites for e in s.train]
    lm, seconds = _timed(lambda: train_lora(model, union, settings,
                                            train.rounds * train.steps * len(sites), pad_id))
    return score("centralised LoRA (union of data)", lm, seconds)


def alone(model, site: SiteData, settings: LearningSettings, pad_id: int, score: Scorer) -> RowRun:
    """A site training by itself on the batches it trains on in the federation."""
    train = settings.train
    batches = BatchStream(site.train, train.batch_size, site_seed(train.seed, site.name), pad_id)
    lm, seconds = _timed(lambda: train_lora(model, site.train, settings,
                                            train.rounds * train.steps, pad_id, batches))
    return score(f"{site.name} alone", lm, seconds)


def flower(model, spec: str, data_dir: Path, sites: list[SiteData], settings: LearningSettings,
           threads: int, score: Scorer) -> RowRun:
    """FedAvg-LoRA of the whole model with Flower, from the centralised row's initial adapter."""
    from flower_baseline import FlowerJob, run_flower

    lm, _ = lora_model(model, settings)
    job = FlowerJob(spec, str(data_dir), settings.model_dump_json(), threads)
    result = run_flower(job, adapter_state(lm), settings.train.rounds, len(sites))
    load_adapter_state(lm, result.adapter)
    return score("Flower FedAvg-LoRA, whole model at every site", lm, result.seconds,
                 {k: v / len(sites) for k, v in result.bytes_per_round.items()})

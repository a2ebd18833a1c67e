"""The in-process simulation: N sites and one split server in one process, R rounds x S steps.

It runs the same step code as the MQTT runtime (`step.split_step`) and the same aggregation, so
it is both the fast way to try a configuration and the reference the runtime's results must
equal. Within a round the sites take their steps in turn (step s of site 0, 1, ..., then step
s+1), against one shared trunk copy (SplitFed-V2); at the round's end the site adapters are
averaged weighted by the tokens each trained on.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from .compression import Downlink, StepCodec, Uplink, payload_bytes
from .config import LearningSettings
from .data import Batch, BatchStream, Example, collate, examples_digest
from .messages import ADAPTER_DOWN, ADAPTER_UP, KINDS
from .robust import aggregate_round
from .split import check_parity, discover
from .step import ServerPart, SitePart, party_options, split_eval, split_step


@dataclass
class SiteData:
    """One site's local training examples and its held-out examples (never mixed)."""

    name: str
    train: list[Example]
    heldout: list[Example]


@dataclass
class RoundMetrics:
    round: int  # 0 = before training
    train_loss: dict[str, float]  # mean over the round's steps, per site
    heldout_loss: dict[str, float]  # per site's held-out data, with the global adapters
    heldout_loss_all: float  # token-weighted over every site's held-out data
    tokens: dict[str, int]  # tokens trained on, per site
    bytes: dict[str, int]  # per message kind, what would cross the wire this round
    seconds: float
    front_seconds: float = 0.0  # the sites' front (prefix + front blocks) compute, summed
    cache: dict[str, int] = field(default_factory=dict)  # sites' cache hits/misses this round
    layers: dict[str, list[int]] = field(default_factory=dict)  # trainable blocks per party


@dataclass
class SimulationResult:
    rounds: list[RoundMetrics]
    site_adapter: dict[str, torch.Tensor]  # the global (averaged) site adapter
    server_adapter: dict[str, torch.Tensor]  # the trunk adapter
    metadata: dict = field(default_factory=dict)


def site_seed(seed: int, name: str) -> int:
    """The batch-order seed of a site: from its name, so it never depends on who joined first."""
    return seed + zlib.crc32(name.encode()) % 1_000_003


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Held-out examples in their given order, batched: evaluation is deterministic."""
    return [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def heldout_losses(evaluate: Callable[[Batch], tuple[float, int]],
                   sets: dict[str, list[Batch]]) -> tuple[dict[str, float], float]:
    """Token-weighted mean loss per named set and over all of them."""
    per, total_loss, total_tokens = {}, 0.0, 0
    for name, batches in sets.items():
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            s, t = evaluate(batch)
            loss_sum, tokens = loss_sum + s, tokens + t
        per[name] = loss_sum / max(tokens, 1)
        total_loss, total_tokens = total_loss + loss_sum, total_tokens + tokens
    return per, total_loss / max(total_tokens, 1)


def simulate(model: torch.nn.Module, sites: Sequence[SiteData], settings: LearningSettings,
             pad_id: int, on_round: Callable[[RoundMetrics], None] | None = None,
             cache_dir: Path | None = None, cache_bytes: int = 1 << 30) -> SimulationResult:
    """Train `model` split between len(sites) simulated sites and one server; see module doc.
    `cache_dir`: each site's prefix activation cache goes in a folder of its name there."""
    train = settings.train
    torch.manual_seed(train.seed)
    cut = settings.split.cut(discover(model).n_blocks)
    settings.check_prefix(cut)
    check_parity(discover(model), (cut.a, cut.b) if cut.b < cut.n else (cut.a,))
    server = ServerPart(copy.deepcopy(model), cut, settings.lora, train.lr, **party_options(settings))
    parts = [SitePart(copy.deepcopy(model), cut, settings.lora, train.lr, **party_options(settings),
                      cache=None if cache_dir is None else (Path(cache_dir) / s.name, cache_bytes))
             for s in sites]
    for part, s in zip(parts, sites):
        part.data_digest = examples_digest(s.train)
        part.prefix.prepare(settings.prefix.frozen)  # an export, as agents do before their rounds
    site_adapter = parts[0].adapter()  # one common initialisation, as the coordinator sends it
    streams = [BatchStream(s.train, train.batch_size, site_seed(train.seed, s.name), pad_id)
               for s in sites]
    heldout = {s.name: eval_batches(s.heldout, train.batch_size, pad_id) for s in sites}

    def evaluate_round(r: int, losses, tokens, sent, started) -> RoundMetrics:
        seconds = time.perf_counter() - started
        front = sum(p.front_seconds for p in parts)
        cache = {k: sum(getattr(p.prefix.cache.stats, k) for p in parts if p.prefix.cache)
                 for k in ("hits", "misses")}
        layers = {"server": sorted(server.selector.trainable),
                  **{s.name: sorted(p.selector.trainable) for s, p in zip(sites, parts)}}
        for p in parts:
            p.front_seconds = 0.0
        parts[0].load_adapter(site_adapter)
        per, overall = heldout_losses(lambda b: split_eval(parts[0], server, b), heldout)
        metrics = RoundMetrics(r, losses, per, overall, tokens, sent, seconds, front,
                               {k: v - counted.get(k, 0) for k, v in cache.items()}, layers)
        counted.update(cache)
        if on_round:
            on_round(metrics)
        return metrics

    counted: dict[str, int] = {}
    history = [evaluate_round(0, {}, {}, {}, time.perf_counter())]
    pipes = settings.compression.pipelines()
    codec, downlink = StepCodec(pipes), Downlink(pipes.download)
    uplinks = [Uplink(pipes.upload) for _ in sites]
    for r in range(1, train.rounds + 1):
        started = time.perf_counter()
        sent = dict.fromkeys(KINDS, 0)
        # as the coordinator does: a delta when the agents hold the last copy, else in full
        delta = downlink.advance(site_adapter)
        sent[ADAPTER_DOWN] = len(sites) * (payload_bytes(downlink.shared, pipes.full_download) if delta is None
                                           else payload_bytes(delta, pipes.download))
        base = downlink.shared
        for part in parts:
            part.load_adapter(base)
        losses = {s.name: 0.0 for s in sites}
        tokens = {s.name: 0 for s in sites}
        for _ in range(train.steps):
            for i, (site, part) in enumerate(zip(sites, parts)):
                result = split_step(part, server, next(streams[i]), key=i, codec=codec)
                losses[site.name] += result.loss / train.steps
                tokens[site.name] += result.tokens
                for kind, n in result.bytes.items():
                    sent[kind] += n
        deltas = []
        for part, uplink in zip(parts, uplinks):
            send, decoded = uplink.delta(part.adapter(), base)
            sent[ADAPTER_UP] += payload_bytes(send, pipes.upload)
            deltas.append(decoded)
        site_adapter, _ = aggregate_round(site_adapter, deltas, [tokens[s.name] for s in sites],
                                          settings.robust, train.server_lr)
        history.append(evaluate_round(r, losses, tokens, sent, started))
    return SimulationResult(history, site_adapter, server.adapter(),
                            {"cut": cut.model_dump(mode="json"), "sites": [s.name for s in sites]})

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
from .compression import Downlink, StepCodec, Uplink, apply, payload_bytes
from .config import LearningSettings, ServerCopies
from .errors import ConfigError
from .hetero import hand_back
from .nodes import check_hetero, close_round, initial_global, node_setup, uniform
from .data import Batch, BatchStream, Example, collate, examples_digest
from .messages import ADAPTER_DOWN, ADAPTER_UP, KINDS
from .robust import aggregate_round
from .split import check_parity, discover
from .step import ServerPart, SitePart, party_options, split_eval, split_step
from .trunk_copies import TrunkCopies, check_per_site
from .trunk_copies import average as average_copies


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
             cache_dir: Path | None = None, cache_bytes: int = 1 << 30,
             plan=None) -> SimulationResult:
    """Train `model` split between len(sites) simulated sites and one server; see module doc.
    `cache_dir`: each site's prefix activation cache goes in a folder of its name there.
    `plan` (a planner.Plan): each site's cut and rank; else the pins, else the run's split."""
    train = settings.train
    if settings.planner.enabled and plan is None:
        raise ConfigError("planner.enabled: the simulation needs the plan (planner.plan on the "
                          "nodes' profiles); or pin each site's cut and rank in planner.pins")
    check_per_site(settings)
    torch.manual_seed(train.seed)
    n_blocks = discover(model).n_blocks
    setups = {s.name: node_setup(settings, n_blocks, s.name, plan) for s in sites}
    hetero = not uniform(setups)
    if hetero:
        check_hetero(settings)
    cut = setups[sites[0].name].cut
    for c in {st.cut for st in setups.values()}:
        check_parity(discover(model), (c.a, c.b) if c.b < c.n else (c.a,))
    server = ServerPart(copy.deepcopy(model), cut, settings.lora, train.lr, **party_options(settings),
                        cuts=[st.ab for st in setups.values()])
    parts = [SitePart(copy.deepcopy(model), setups[s.name].cut, setups[s.name].lora, train.lr,
                      **party_options(settings),
                      cache=None if cache_dir is None else (Path(cache_dir) / s.name, cache_bytes))
             for s in sites]
    # split.server per-site (SplitFed-V1): each site's steps train its own copy of the trunk
    copies = TrunkCopies(server) if settings.split.server is ServerCopies.PER_SITE else None
    for part, s in zip(parts, sites):
        part.data_digest = examples_digest(s.train)
        part.prefix.prepare(settings.prefix.frozen)  # an export, as agents do before their rounds
    site_adapter = parts[0].adapter()  # one common initialisation, as the coordinator sends it
    if hetero:  # every party starts from its truncation of one initialisation of every block
        top = max([settings.lora.rank] + [st.lora.rank for st in setups.values()])
        site_adapter = initial_global(model, settings.lora, top, train.seed)
        for part in [server, *parts]:
            part.load_adapter(hand_back(site_adapter, part.adapter(), settings.lora.alpha))
    streams = [BatchStream(s.train, train.batch_size, site_seed(train.seed, s.name), pad_id)
               for s in sites]
    heldout = {s.name: eval_batches(s.heldout, train.batch_size, pad_id) for s in sites}
    # hetero: each site's held-out data through its own part (its blocks at its rank, its cut)
    owner = {id(b): part for s, part in zip(sites, parts) for b in heldout[s.name]}

    def evaluate_round(r: int, losses, tokens, sent, started) -> RoundMetrics:
        seconds = time.perf_counter() - started
        front = sum(p.front_seconds for p in parts)
        cache = {k: sum(getattr(p.prefix.cache.stats, k) for p in parts if p.prefix.cache)
                 for k in ("hits", "misses")}
        layers = {"server": sorted(server.selector.trainable),
                  **{s.name: sorted(p.selector.trainable) for s, p in zip(sites, parts)}}
        for p in parts:
            p.front_seconds = 0.0
        if hetero:
            per, overall = heldout_losses(lambda b: split_eval(owner[id(b)], server, b), heldout)
        else:
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
        if hetero:  # each site holds its own hand-back, sent to it in full
            bases = [part.adapter() for part in parts]
            sent[ADAPTER_DOWN] = sum(payload_bytes(b, pipes.full_download) for b in bases)
        else:
            # as the coordinator does: a delta when the agents hold the last copy, else in full
            delta = downlink.advance(site_adapter)
            sent[ADAPTER_DOWN] = len(sites) * (payload_bytes(downlink.shared, pipes.full_download)
                                               if delta is None else payload_bytes(delta, pipes.download))
            base = downlink.shared
            bases = [base] * len(sites)
            for part in parts:
                part.load_adapter(base)
        losses = {s.name: 0.0 for s in sites}
        tokens = {s.name: 0 for s in sites}
        if copies:
            copies.begin_round(server.adapter())
        for _ in range(train.steps):
            for i, (site, part) in enumerate(zip(sites, parts)):
                if copies:
                    copies.use(site.name)
                result = split_step(part, server, next(streams[i]), key=i, codec=codec)
                losses[site.name] += result.loss / train.steps
                tokens[site.name] += result.tokens
                for kind, n in result.bytes.items():
                    sent[kind] += n
        deltas = []
        for part, uplink, b in zip(parts, uplinks, bases):
            send, decoded = uplink.delta(part.adapter(), b)
            sent[ADAPTER_UP] += payload_bytes(send, pipes.upload)
            deltas.append(decoded)
        if hetero:
            received = {s.name: (apply(b, d), tokens[s.name]) for s, b, d in zip(sites, bases, deltas)}
            site_adapter, back, trunk = close_round(
                received, {n: st.ab for n, st in setups.items()}, server.adapter(), settings.lora,
                server.parts.blocks_name)
            server.load_adapter(trunk)
            for s, part in zip(sites, parts):
                part.load_adapter(back[s.name])
        else:
            site_adapter, outcome = aggregate_round(site_adapter, deltas, [tokens[s.name] for s in sites],
                                                    settings.robust, train.server_lr)
            if copies:  # the trunk: the copies of the sites whose update was accepted
                kept = [s.name for s, v in zip(sites, outcome.verdicts) if v.status != "rejected"]
                copies.end_round(average_copies({n: copies.state(n) for n in kept},
                                                {n: tokens[n] for n in kept}) if kept else copies.base_state())
        history.append(evaluate_round(r, losses, tokens, sent, started))
    meta = {"cut": cut.model_dump(mode="json"), "sites": [s.name for s in sites]}
    if hetero:
        meta["nodes"] = {n: {"a": st.cut.a, "b": st.cut.b, "rank": st.lora.rank}
                         for n, st in setups.items()}
    return SimulationResult(history, site_adapter, server.adapter(), meta)

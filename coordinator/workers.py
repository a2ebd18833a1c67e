"""The coordinator's side of split-server workers (training.split.server "per-site").

Each round it sends the workers the round's trunk (topic_trunk; again to a worker that says
HELLO: a new replica, or one that missed it), collects every site's trunk copy from whichever
worker served the site, and gives the round's trunk back as the copies' token-weighted average
(fsl_edge.trunk_copies.average, the simulation's own). Workers only serve steps: the
coordinator stays the one aggregator, checkpoint and ledger writer.
"""

from __future__ import annotations

import time

import torch

from fsl_edge import protocol
from fsl_edge.errors import ProtocolError
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.status import WorkerStatus
from fsl_edge.trunk_copies import average
from fsl_edge.wire import Address, adapter_envelope, adapter_state

State = dict[str, torch.Tensor]
Out = tuple[str, Envelope]
MAX_WORKERS = 1024  # the registry of worker ids (names a sender with the key may invent)


class TrunkWorkers:
    def __init__(self, run: str):
        self.run = run
        self.trunk: Envelope | None = None  # this round's, while it runs
        self.base: State = {}
        self.attempt: str | None = None
        self.copies: dict[str, tuple[str, State]] = {}  # site -> (worker, its copy)
        self.workers: dict[str, WorkerStatus] = {}
        self.traffic: dict[str, dict[str, tuple[int, int, int]]] = {}  # site -> kind -> counts

    def begin(self, round_: int, attempt: str, steps: int, trunk: State) -> Out:
        """The round's trunk, to publish to every worker before the agents start."""
        self.base, self.attempt, self.copies, self.traffic = trunk, attempt, {}, {}
        self.trunk = adapter_envelope(MessageKind.ADAPTER_DOWN, trunk, Address(self.run, "", round_),
                                      {"attempt": attempt, "steps": steps})
        return protocol.topic_trunk(self.run), self.trunk

    def end(self) -> None:
        self.trunk = None

    def on_message(self, worker: str, env: Envelope, members: set[str]) -> list[Out]:
        """A worker's HELLO (answered with the running round's trunk) or a site's copy."""
        if worker not in self.workers and len(self.workers) >= MAX_WORKERS:
            # pods come and go under new names: the one heard from longest ago makes room
            del self.workers[min(self.workers, key=lambda w: self.workers[w].last_seen or 0.0)]
        st = self.workers.setdefault(worker, WorkerStatus())
        st.last_seen = time.time()
        if env.kind is MessageKind.HELLO:  # it lacks this round's trunk (or says which it holds)
            if self.trunk is None or env.meta.get("attempt") == self.attempt:
                return []
            return [(protocol.topic_trunk(self.run), self.trunk)]
        if env.kind is not MessageKind.ADAPTER_UP:
            raise ProtocolError(f"{env.kind.name} is not a worker's message")
        site = env.agent_id
        if self.trunk is None or env.meta.get("attempt") != self.attempt or site not in members:
            return []  # late: a round (or a site) that has moved on
        state = adapter_state(env, self.base, protocol.Limits().max_tensor_bytes)
        self.copies[site] = (worker, state)
        self.traffic[site] = reported_traffic(env.meta.get("traffic"))
        return []

    def missing(self, sites: set[str]) -> set[str]:
        return sites - set(self.copies)

    def drop(self, site: str) -> None:
        self.copies.pop(site, None)

    def close(self, tokens: dict[str, int]) -> State:
        """The round's trunk from the copies of the sites in `tokens` (their weights)."""
        served: dict[str, list[str]] = {}
        for site in tokens:
            served.setdefault(self.copies[site][0], []).append(site)
        for worker, sites in served.items():
            st = self.workers[worker]
            st.copies, st.sites = st.copies + len(sites), sorted(sites)
        self.trunk = None
        if not tokens:  # every update was rejected: the trunk stays as it was
            return self.base
        return average({s: self.copies[s][1] for s in tokens}, tokens)


STEP_KINDS = {k.name.lower() for k in (MessageKind.ACTIVATION_UP, MessageKind.ACTIVATION_DOWN,
                                       MessageKind.GRADIENT_UP, MessageKind.GRADIENT_DOWN)}


def reported_traffic(traffic) -> dict[str, tuple[int, int, int]]:
    """A site's step traffic as its worker counted it: kind -> (messages, bytes, raw bytes);
    step kinds with whole, non-negative, bounded counts only (it is shown, not used)."""
    if not isinstance(traffic, dict):
        return {}
    ok = {}
    for kind, counts in traffic.items():
        if kind in STEP_KINDS and isinstance(counts, list) and len(counts) == 3 and all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 53 for n in counts):
            ok[kind] = (counts[0], counts[1], counts[2])
    return ok

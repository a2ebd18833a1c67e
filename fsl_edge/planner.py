"""Choose a cut (a, b), a LoRA rank and a step codec per node: the smallest round makespan that
fits every node's memory, found by an exact search over every candidate (FedsLLM's inner step).

The objective, with the per-node round time R_i and server work W_i of fsl_edge.delay::

    makespan = max( max_i R_i(c_i),  sum_i W_i(c_i) / server workers )

Each node's round includes the server's compute for its steps (it waits for it); W_i is how
long node i's steps hold the one shared trunk, which serves one step at a time (in u-shape
from the trunk's forward to its backward: the node's back blocks, head and two hops too), and
the sum is the bound that puts on everyone. With N nodes and K candidates each, the product
has K^N plans (SmolLM2: 406 cuts x 3 ranks, 1.8e9 plans for 3 nodes);
the search needs none of them: for a threshold T on the slowest node, the best each node can do
for the server is its least server work among its candidates with R_i <= T, so

    optimum = min over T in {every R_i(c)} of max(T, sum_i min{W_i(c) : R_i(c) <= T} / workers)

which is exact (the optimal plan's slowest node is one of those T) and costs O(N K log K) per T.

What the nodes off the critical path do with their slack: with the makespan held within
`slack` of the optimum, each node takes, in this order, the earliest codec in `codecs` (list
the least lossy first), the highest rank, the most site blocks, then the deepest front (the
server sees activations further from the tokens), never past the slack on the
shared trunk either (the nodes take its room in turn); a fast node ends up training more and relieving the server.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from .config import SplitMode
from .delay import Candidate, CodecOption, Estimate, ModelSpec, Workload, estimate, makespan  # noqa: F401  (CodecOption: re-exported)
from .errors import ConfigError
from .planner_settings import Pin, PlannerSettings
from .profile import NodeProfile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodePlan(_Strict):
    """One node's choice and what the delay model predicts for it."""

    a: int
    b: int
    rank: int
    codec: str
    step_s: float
    """Predicted seconds per step, with its share of the round's adapter sync."""
    round_s: float
    site_s: float
    wire_s: float
    server_s: float
    sync_s: float
    memory_bytes: int
    pinned: bool = False


class Plan(_Strict):
    """The planner's output, JSON-serialisable for status (`plan.model_dump(mode="json")`)."""

    mode: SplitMode
    nodes: dict[str, NodePlan]
    makespan_s: float
    server_busy_s: float
    """How long the nodes hold the shared trunk in a round, in all, per worker."""
    bottleneck: str
    """The node whose round is the makespan, or 'server'."""


def candidates(spec: ModelSpec, work: Workload, settings: PlannerSettings,
               pin: Pin | None = None) -> list[Candidate]:
    """Every (a, b, rank, codec) of the settings that is a valid cut and matches the pin."""
    pin = pin or Pin()
    n = spec.n_blocks
    fronts = settings.fronts or tuple(range(1, n - 1))
    if work.mode is SplitMode.VANILLA:
        backs = (0,)
    else:
        backs = settings.backs or tuple(range(1, n - 1))
    out = []
    for a in fronts:
        for back in backs:
            for rank in settings.ranks:
                for codec in settings.codecs:
                    b = n - back
                    if not (1 <= a < b <= n) or (work.mode is SplitMode.U_SHAPE and back < 1):
                        continue
                    if any(p is not None and p != v for p, v in
                           ((pin.front, a), (pin.back, back), (pin.rank, rank), (pin.codec, codec.name))):
                        continue
                    out.append(Candidate(a, b, rank, codec.name))
    return out


def node_options(spec: ModelSpec, work: Workload, node_id: str, node: NodeProfile,
                 server: NodeProfile, settings: PlannerSettings) -> list[tuple[Candidate, Estimate]]:
    """A node's candidates that fit its memory, with their estimates; ConfigError if none."""
    codecs = {c.name: c for c in settings.codecs}
    pin = settings.pins.get(node_id)
    if pin and pin.codec is not None and pin.codec not in codecs:
        raise ConfigError(f"node {node_id} is pinned to codec {pin.codec!r}, which is not among "
                          f"the planner's codecs ({', '.join(codecs)})")
    listed = candidates(spec, work, settings, pin)
    if not listed:
        raise ConfigError(f"node {node_id}: no valid cut among the candidates"
                          + (f" with its pin {pin.model_dump(exclude_none=True)}" if pin else ""))
    budget = node.memory_bytes * settings.memory_fraction
    options = [(c, estimate(spec, work, node, server, c, codecs[c.codec])) for c in listed]
    fitting = [(c, e) for c, e in options if e.memory_bytes <= budget]
    if not fitting:
        least = min(e.memory_bytes for _, e in options)
        raise ConfigError(f"node {node_id} has {budget / 2**20:.0f} MiB to train in, but its "
                          f"smallest candidate needs {least / 2**20:.0f} MiB"
                          + (" (it is pinned)" if pin else "") + ": lower the batch, the rank or "
                          "the cut, or give it more memory")
    return fitting


def plan(spec: ModelSpec, work: Workload, nodes: Mapping[str, NodeProfile], server: NodeProfile,
         settings: PlannerSettings = PlannerSettings()) -> Plan:
    """The plan of least makespan (see the module docstring); ties go to the nodes' preferences."""
    if not nodes:
        raise ConfigError("the planner needs at least one node")
    unknown = set(settings.pins) - set(nodes)
    if unknown:
        raise ConfigError(f"pins for unknown nodes: {', '.join(sorted(unknown))}")
    order = {c.name: i for i, c in enumerate(settings.codecs)}
    # per node: options sorted by round time, and the running least server work over them
    table = {}
    for node_id, profile in nodes.items():
        opts = sorted(node_options(spec, work, node_id, profile, server, settings),
                      key=lambda o: (o[1].round_s, o[1].busy_s))
        best, least = [], 0
        for i, (_, e) in enumerate(opts):
            if e.busy_s < opts[least][1].busy_s:
                least = i
            best.append(least)
        table[node_id] = (opts, [e.round_s for _, e in opts], best)

    optimum, chosen = float("inf"), {}
    for t in sorted({r for _, rounds, _ in table.values() for r in rounds}):
        if t >= optimum:
            break  # every later threshold is already worse
        picks = {}
        for node_id, (opts, rounds, best) in table.items():
            k = bisect_right(rounds, t) - 1
            if k < 0:
                break
            picks[node_id] = opts[best[k]]
        else:
            value = max(t, sum(e.busy_s for _, e in picks.values()) / work.server_workers)
            if value < optimum:
                optimum, chosen = value, picks

    # the nodes' preferences within the slack: each round, and the trunk's time in all (what a
    # node takes of the server's room, in the nodes' order, the next cannot take)
    limit = optimum * (1 + settings.slack) * (1 + 1e-12)
    room = limit * work.server_workers - sum(e.busy_s for _, e in chosen.values())
    final = {}
    for node_id, (c0, e0) in chosen.items():
        allowed = [(c, e) for c, e in table[node_id][0]
                   if e.round_s <= limit and e.busy_s - e0.busy_s <= room]
        final[node_id] = max(allowed, key=lambda o: (-order[o[0].codec], o[0].rank,
                                                     -o[1].busy_s, o[0].a, -o[1].round_s))
        room -= final[node_id][1].busy_s - e0.busy_s
    return _plan(work, final, settings)


def _plan(work: Workload, final: Mapping[str, tuple[Candidate, Estimate]],
          settings: PlannerSettings) -> Plan:
    ests = [e for _, e in final.values()]
    span = makespan(ests, work.server_workers)
    busy = sum(e.busy_s for e in ests) / work.server_workers
    slowest = max(final, key=lambda n: final[n][1].round_s)
    nodes = {n: NodePlan(a=c.a, b=c.b, rank=c.rank, codec=c.codec,
                         step_s=e.step_s + e.sync_s / work.steps, round_s=e.round_s,
                         site_s=e.site_s, wire_s=e.wire_s, server_s=e.server_s, sync_s=e.sync_s,
                         memory_bytes=e.memory_bytes, pinned=n in settings.pins)
             for n, (c, e) in final.items()}
    return Plan(mode=work.mode, nodes=nodes, makespan_s=span, server_busy_s=busy,
                bottleneck="server" if busy >= final[slowest][1].round_s else slowest)

"""Per-agent cuts and ranks in the coordinator: which trunk to build for the first round's
agents, and each agent's own copy of the site adapter when they differ (fsl_edge.nodes).

The trunk is built when the first round's agents are known (their pins, or the plan made from
their profiles with `planner.enabled`, name their cuts); later agents whose cut the trunk does
not serve wait outside the rounds.
"""

from __future__ import annotations

import copy
import logging

import torch

from fsl_edge.config import LearningSettings
from fsl_edge.hetero import hand_back
from fsl_edge.nodes import NodeSetup, check_hetero, close_round, initial_global, node_setup, site_view, uniform
from fsl_edge.split import check_parity, discover
from fsl_edge.step import ServerPart, SitePart, party_options

from .planning import Planning

log = logging.getLogger("fsl_edge.coordinator")


class Fleet:
    def __init__(self, training: LearningSettings, model: torch.nn.Module):
        self.training, self.model = training, model  # the base model, kept to build the trunk
        self.n_blocks = discover(model).n_blocks
        self.hetero = False  # the agents differ in cut or rank: per-layer aggregation
        self.planning = Planning(training, model)
        if self.planning.enabled:  # a plan may give the agents different cuts: refuse at start
            check_hetero(training)

    def setup(self, agent: str) -> NodeSetup:
        return node_setup(self.training, self.n_blocks, agent, self.planning.plan)

    def needs_rebuild(self, agents: list[str], trunk: ServerPart) -> bool:
        """Whether the trunk built at start (the run's cut, lora.rank) is not this fleet's."""
        default = (trunk.cut.a, trunk.cut.b, self.training.lora.rank)
        return any((*self.setup(a).ab, self.setup(a).lora.rank) != default for a in agents)

    def build(self, agents: list[str]) -> tuple[ServerPart, dict]:
        """(trunk, site adapter) for these agents, from the seed as simulation.simulate builds
        them, so the run reproduces the simulation of the same sites."""
        train, lora = self.training.train, self.training.lora
        setups = {a: self.setup(a) for a in agents}
        for c in {s.cut for s in setups.values()}:
            check_parity(discover(self.model), (c.a, c.b) if c.b < c.n else (c.a,))
        self.hetero = not uniform(setups)
        if self.hetero:
            check_hetero(self.training)
        torch.manual_seed(train.seed)
        first = setups[agents[0]]
        options = party_options(self.training)
        trunk = ServerPart(copy.deepcopy(self.model), first.cut, lora, train.lr, **options,
                           cuts=[s.ab for s in setups.values()])
        if not self.hetero:
            site = SitePart(copy.deepcopy(self.model), first.cut, first.lora, train.lr, **options)
            return trunk, site.adapter()
        top = max([lora.rank] + [s.lora.rank for s in setups.values()])
        global_ = initial_global(self.model, lora, top, train.seed)
        trunk.load_adapter(hand_back(global_, trunk.adapter(), lora.alpha))
        log.info("per-node cuts and ranks: %s", ", ".join(
            f"{a} {s.cut.a}/{s.cut.b} r{s.lora.rank}" for a, s in setups.items()))
        return trunk, global_

    def view(self, global_: dict, agent: str) -> dict:
        """The agent's own blocks at its own rank, from the global adapter."""
        return site_view(global_, self.setup(agent), self.training.prefix.frozen,
                         discover(self.model).blocks_name)

    def close(self, received: dict[str, tuple[dict, float]], trunk: ServerPart) -> dict:
        """Aggregate a round across cuts and ranks; loads the trunk's hand-back; the global."""
        global_, _, back = close_round(received, {a: self.setup(a).ab for a in received},
                                       trunk.adapter(), self.training.lora, trunk.parts.blocks_name)
        trunk.load_adapter(back)
        return global_

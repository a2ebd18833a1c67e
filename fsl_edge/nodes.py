"""A cut and a LoRA rank per node: resolve them, start the parties off one adapter, and close a
round across them; the simulation and the coordinator both use these, so they agree.

A node's (cut, rank) comes from the plan (planner on), else its pin, else the run's `split` and
`lora.rank`. When every node has the same, the run is the homogeneous one (`uniform`), which
keeps its own aggregation (robust screening, FedOpt, compressed deltas) bit for bit. Otherwise
a round closes with `fsl_edge.hetero`: per-layer FedAvg over the sites' adapters (weighted by
their tokens) and the trunk's copy (weighted, per block, by the tokens of the sites whose cut
put that block on the server), ranks zero-padded (HetLoRA); each site gets back its own blocks
at its own rank and the trunk its layers at the trunk's rank.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import Cut, LearningSettings, LoraSettings, RobustRule, SplitSettings
from .errors import ConfigError
from .hetero import State, aggregate, hand_back, server_block_weights
from .lora import adapter_state, attach
from .split import discover


@dataclass(frozen=True)
class NodeSetup:
    """What one node trains: its cut and its site LoRA (the run's, at the node's rank)."""

    cut: Cut
    lora: LoraSettings

    @property
    def ab(self) -> tuple[int, int]:
        return self.cut.a, self.cut.b


def node_setup(settings: LearningSettings, n_blocks: int, node: str, plan=None) -> NodeSetup:
    """The node's cut and rank: the plan's choice, else its pin, else the run's. `plan`: a
    planner.Plan, or this node's own planner.NodePlan (what an agent is sent)."""
    split = settings.split
    choice = plan.nodes.get(node) if hasattr(plan, "nodes") else plan
    if choice is not None:
        front, back, rank = choice.a, n_blocks - choice.b, choice.rank
    else:
        pin = settings.planner.pins.get(node)
        front = pin.front if pin and pin.front is not None else split.front
        back = pin.back if pin and pin.back is not None else split.back
        rank = pin.rank if pin and pin.rank is not None else settings.lora.rank
    cut = SplitSettings(mode=split.mode, front=front, back=back).cut(n_blocks)
    settings.check_prefix(cut)
    return NodeSetup(cut, settings.lora.model_copy(update={"rank": rank}))


def uniform(setups: Mapping[str, NodeSetup]) -> bool:
    """Every node has the same cut and rank: the homogeneous run, aggregated as before."""
    return len({(s.ab, s.lora.rank) for s in setups.values()}) <= 1


def check_hetero(settings: LearningSettings) -> None:
    """Refuse what the cross-cut aggregation does not do yet, rather than skip it silently."""
    if settings.robust.rule is not RobustRule.NONE or settings.train.server_lr != 1.0:
        raise ConfigError("nodes with different cuts or ranks are aggregated by plain per-layer "
                          "FedAvg: set robust.rule to 'none' and train.server_lr to 1")
    if settings.lora.site_freeze_a:
        raise ConfigError("lora.site_freeze_a needs one shared A per module, which the trunk's "
                          "copy does not keep across different cuts: unset it or pin one cut")


def initial_global(model: torch.nn.Module, lora: LoraSettings, rank: int, seed: int) -> State:
    """One LoRA initialisation of every block at `rank`, from its own seeded RNG (the same in
    every process whatever ran before): every party starts from its truncation, so the copies
    of a block that different parties train start equal and their average means something."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        n = discover(model).n_blocks
        return adapter_state(attach(copy.deepcopy(model), list(range(n)),
                                    lora.model_copy(update={"rank": rank})))


def close_round(sites: Mapping[str, tuple[State, float]], cuts: Mapping[str, tuple[int, int]],
                trunk: State, lora: LoraSettings, blocks_name: str = "layers"
                ) -> tuple[State, dict[str, State], State]:
    """(global adapter, each site's hand-back, the trunk's hand-back) from the sites' adapters
    and tokens, their cuts, and the trunk's copy."""
    tokens = {name: w for name, (_, w) in sites.items()}
    parties = [(state, float(w)) for state, w in sites.values()]
    parties.append((trunk, server_block_weights({n: cuts[n] for n in sites}, tokens)))
    global_ = aggregate(parties, method="pad", alpha=lora.alpha, blocks_name=blocks_name)
    back = {name: hand_back(global_, state, lora.alpha) for name, (state, _) in sites.items()}
    return global_, back, hand_back(global_, trunk, lora.alpha)


def site_view(global_: State, setup: NodeSetup, frozen: int = 0, blocks_name: str = "layers") -> State:
    """What a site at `setup` trains, from the global adapter: its LoRA blocks (site blocks past
    the frozen prefix) at its rank; the same as hand_back of its own adapter."""
    from .hetero import block_index

    blocks = {i for i in setup.cut.site_blocks if i >= frozen}
    rank, mine = setup.lora.rank, {}
    for k, v in global_.items():
        if block_index(k, blocks_name) in blocks:  # (r, d_in) for A, (d_out, r) for B
            mine[k] = v.new_empty((rank, v.shape[1]) if ".lora_A." in k else (v.shape[0], rank))
    return hand_back(global_, mine, setup.lora.alpha)

"""SplitFed-V1 on one trunk model: a copy of the round's trunk adapter, and its own optimizer,
per site (training.split.server "per-site").

Every site's steps train its own copy, started from the round's trunk with a fresh optimizer;
the round closes with the token-weighted average of the copies. So what a copy becomes depends
only on that site's batches: a worker may serve any set of sites, in any order, and the result
is the same; which is what lets several split-server workers share the sites (split_worker).
The simulation and the workers switch copies with this one class, so they compute the same.

The copies share the model's LoRA parameters: a copy is loaded into them before its site's step
and taken out when another site's step comes. A u-shape step holds the trunk's graph from its
forward to its backward, so nothing else may switch copies in between (the workers serve one
step at a time).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .aggregation import fedavg
from .config import LearningSettings, Policy, ServerCopies
from .errors import ConfigError
from .step import ServerPart

State = dict[str, torch.Tensor]


def check_per_site(settings: LearningSettings) -> None:
    """Refuse what per-site trunk copies do not do, rather than do it differently."""
    if settings.split.server is not ServerCopies.PER_SITE:
        return
    if settings.selection.policy is not Policy.ALL:
        raise ConfigError("split.server 'per-site' trains every trunk block of every copy: "
                          "set selection.policy to 'all' (layer selection needs one trunk copy)")
    if settings.planner.enabled or settings.planner.pins:
        raise ConfigError("split.server 'per-site' needs one cut for every site: turn the "
                          "planner off and remove its pins, or use split.server 'shared'")


@dataclass
class _Copy:
    state: State
    optimizer: torch.optim.Optimizer


class TrunkCopies:
    def __init__(self, part: ServerPart):
        self.part = part
        self.params = [p for g in part.optimizer.param_groups for p in g["params"]]
        # the part's own optimizer, remade per copy (its defaults, as its constructor takes them)
        kind = type(part.optimizer)
        accepted = inspect.signature(kind).parameters
        self.new_optimizer = lambda: kind(self.params, **{k: v for k, v in part.optimizer.defaults.items()
                                                          if k in accepted})
        self.base: State = part.adapter()
        self.copies: dict[str, _Copy] = {}
        self.current: str | None = None

    def begin_round(self, base: State) -> None:
        """Every copy starts again from `base`, the round's trunk."""
        self.base = {k: v.detach().clone() for k, v in base.items()}
        self.copies.clear()
        self.current = None
        self.part.load_adapter(self.base)

    def use(self, site: str) -> None:
        """Load `site`'s copy (a new one from the round's trunk if it has none) for its step."""
        if self.current == site:
            return
        self._put_back()
        copy = self.copies.get(site)
        if copy is None:
            copy = self.copies[site] = _Copy(self.base, self.new_optimizer())
        self.part.load_adapter(copy.state)
        self.part.optimizer = copy.optimizer
        self.current = site

    def restart(self, site: str) -> None:
        """Drop `site`'s copy: its next step starts a new one from the round's trunk."""
        if self.current == site:
            self.current = None
        self.copies.pop(site, None)

    def state(self, site: str) -> State:
        """`site`'s copy as it stands."""
        self._put_back()
        return self.copies[site].state

    def _put_back(self) -> None:
        if self.current is not None:
            self.copies[self.current].state = self.part.adapter()
            self.current = None


def average(copies: Mapping[str, State], tokens: Mapping[str, int]) -> State:
    """The round's trunk: the copies averaged by their sites' tokens, in site-name order (the
    coordinator and the simulation add them up in the same order, so they agree to the bit)."""
    names: Sequence[str] = sorted(copies)
    return fedavg([copies[n] for n in names], [float(tokens[n]) for n in names])

"""SplitFed-V1 on one trunk model: a copy of the round's trunk adapter, and its own optimizer,
per site (training.split.server "per-site").

Every site's steps train its own copy, started from the round's trunk with a fresh optimizer;
the round closes with the token-weighted average of the copies. So what a copy becomes depends
only on that site's batches: a worker may serve any set of sites, in any order, and the result
is the same; which is what lets several split-server workers share the sites (split_worker).
The simulation and the workers switch copies with this one class, so they compute the same.

Each copy is its own set of LoRA parameters, swapped into the model for its site's step, so a
worker can serve another site while a u-shape step waits for its gradient: the waiting step's
graph keeps the parameters it was built with.
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
    params: list[torch.nn.Parameter]  # in the order of TrunkCopies.slots
    optimizer: torch.optim.Optimizer


class TrunkCopies:
    """The copies of one ServerPart's LoRA weights. Each copy is its own set of Parameter
    objects, put in the LoRA modules' place for its site's step (an attribute swap, nothing is
    written in place): a u-shape step's graph keeps the copy it was built with, so another
    site's step may run while the first waits for its gradient."""

    def __init__(self, part: ServerPart):
        self.part = part
        # every trainable LoRA weight of the trunk: (the module holding it, its attribute)
        self.slots = [(part.model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
                      for name, p in part.model.named_parameters() if "lora_" in name and p.requires_grad]
        self.template = [getattr(m, a) for m, a in self.slots]  # holds the round's trunk
        # the part's own optimizer, remade per copy (its defaults, as its constructor takes them)
        kind = type(part.optimizer)
        accepted = inspect.signature(kind).parameters
        self.new_optimizer = lambda params: kind(params, **{
            k: v for k, v in part.optimizer.defaults.items() if k in accepted})
        self.copies: dict[str, _Copy] = {}
        self.current: str | None = None

    def begin_round(self, base: State) -> None:
        """Every copy starts again from `base`, the round's trunk."""
        self.end_round(base)
        self.copies.clear()

    def end_round(self, trunk: State) -> None:
        """The part holds `trunk` (the copies' average), in no copy's place."""
        self._install(self.template, None)
        self.part.load_adapter(trunk)

    def use(self, site: str) -> None:
        """Put `site`'s copy (a new one from the round's trunk if it has none) in place, with its
        optimizer, for its step."""
        if self.current == site:
            return
        copy = self.copies.get(site)
        if copy is None:
            params = [torch.nn.Parameter(t.detach().clone()) for t in self.template]
            copy = self.copies[site] = _Copy(params, self.new_optimizer(params))
        self._install(copy.params, copy.optimizer)
        self.current = site

    def base_state(self) -> State:
        """The round's trunk, as the copies started from it (the template never trains)."""
        self._install(self.template, None)
        return self.part.adapter()

    def restart(self, site: str) -> None:
        """Drop `site`'s copy: its next step starts a new one from the round's trunk."""
        if self.current == site:
            self._install(self.template, None)
        self.copies.pop(site, None)

    def state(self, site: str) -> State:
        """`site`'s copy as it stands."""
        self.use(site)
        return self.part.adapter()

    def _install(self, params: list[torch.nn.Parameter], optimizer) -> None:
        for (module, attr), p in zip(self.slots, params):
            setattr(module, attr, p)
        if optimizer is not None:
            self.part.optimizer = optimizer
        self.current = None


def average(copies: Mapping[str, State], tokens: Mapping[str, int]) -> State:
    """The round's trunk: the copies averaged by their sites' tokens, in site-name order (the
    coordinator and the simulation add them up in the same order, so they agree to the bit)."""
    names: Sequence[str] = sorted(copies)
    return fedavg([copies[n] for n in names], [float(tokens[n]) for n in names])

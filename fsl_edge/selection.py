"""Layer selection: which of a party's LoRA blocks train in an epoch, by the configured policy.

Each party (a site, the server) selects among its own blocks with its own gradient norms. A
frozen block's LoRA weights get `requires_grad=False`, so autograd computes no weight gradient
for them and the optimizer holds no state for them (what it had is dropped); when every block
below a cut is frozen, no gradient is computed below it at all (see `step`).

Gradient norms: the mean over an epoch's steps of the norm of a block's LoRA gradients. A block
frozen in an epoch has no new norm; it keeps the last one measured, which lets it come back once
the trained blocks' norms fall below it (no extra backward pass is spent to measure it).
"""

from __future__ import annotations

import math
import random
import re

import torch
from torch import nn

from .config import Policy, SelectionSettings


class LayerSelector:
    def __init__(self, model: nn.Module, blocks_name: str, blocks: list[int],
                 settings: SelectionSettings, seed: int, front: list[int] | None = None):
        """`blocks`: the party's LoRA blocks; `front`: those freeze-front may freeze, in order
        (by default all of them); at least one block always stays trainable."""
        self.settings, self.seed = settings, seed
        self.blocks = sorted(blocks)
        self.front = list(self.blocks if front is None else front)
        pattern = re.compile(rf"\.{re.escape(blocks_name)}\.(\d+)\.")
        self.params: dict[int, list[nn.Parameter]] = {b: [] for b in self.blocks}
        for name, p in model.named_parameters():
            match = pattern.search(name)
            if "lora_" in name and p.requires_grad and match and int(match.group(1)) in self.params:
                self.params[int(match.group(1))].append(p)
        self.trainable = set(self.blocks)
        self.epoch = 0
        self.norms: dict[int, float] = {}  # last epoch's mean gradient norm per block
        self.previous: dict[int, float] = {}  # the epoch before (freeze-front compares the two)
        self._sums: dict[int, float] = dict.fromkeys(self.blocks, 0.0)
        self._counts: dict[int, int] = dict.fromkeys(self.blocks, 0)
        self.history: list[tuple[int, list[int]]] = [(0, sorted(self.trainable))]

    @property
    def budget(self) -> int:
        return max(1, math.floor(self.settings.fraction * len(self.blocks) + 0.5))

    def observe(self) -> None:
        """Add this step's gradient norms of the trainable blocks (call before the optimizer)."""
        for b in self.trainable:
            grads = [p.grad for p in self.params[b] if p.grad is not None]
            if grads:
                self._sums[b] += torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g.float()) for g in grads])).item()
                self._counts[b] += 1

    def at_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> bool:
        """Re-select when `epoch` is a new one; returns whether the trainable set changed."""
        if epoch <= self.epoch:
            return False
        self.epoch = epoch
        measured = {b: self._sums[b] / self._counts[b] for b in self.blocks if self._counts[b]}
        self._sums, self._counts = dict.fromkeys(self.blocks, 0.0), dict.fromkeys(self.blocks, 0)
        self.previous = {**self.previous, **{b: self.norms[b] for b in measured if b in self.norms}}
        self.norms = {**self.norms, **measured}
        chosen = self._choose(epoch, measured)
        changed = chosen != self.trainable
        self.set_trainable(chosen, optimizer)
        self.history.append((epoch, sorted(chosen)))
        return changed

    def _choose(self, epoch: int, measured: dict[int, float]) -> set[int]:
        policy = self.settings.policy
        if policy is Policy.ALL or not self.blocks:
            return set(self.blocks)
        if policy is Policy.RANDOM:
            return set(random.Random(self.seed * 1_000_003 + epoch).sample(self.blocks, self.budget))
        if policy is Policy.TOPK_GRADNORM:
            # blocks never measured rank first: every block gets measured once before it can lose
            ranked = sorted(self.blocks, key=lambda b: (-self.norms.get(b, math.inf), b))
            return set(ranked[:self.budget])
        chosen = set(self.trainable)  # freeze-front: only ever grows the frozen front
        for b in self.front:
            if b not in chosen:
                continue
            if len(chosen) == 1 or b not in measured or b not in self.previous:
                break
            change = abs(measured[b] - self.previous[b]) / max(self.previous[b], 1e-12)
            if change >= self.settings.threshold:
                break
            chosen.discard(b)
        return chosen

    def set_trainable(self, chosen: set[int], optimizer: torch.optim.Optimizer) -> None:
        self.trainable = set(chosen)
        for b, params in self.params.items():
            for p in params:
                p.requires_grad_(b in chosen)
                if b not in chosen:
                    p.grad = None
                    optimizer.state.pop(p, None)  # a frozen block holds no optimizer state

    def frozen_front(self) -> int:
        """How many of `front` are frozen, from its start: the part of it that is cacheable."""
        n = 0
        for b in self.front:
            if b in self.trainable:
                break
            n += 1
        return n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "trainable": sorted(self.trainable),
                "norms": {str(b): v for b, v in self.norms.items()},
                "previous": {str(b): v for b, v in self.previous.items()},
                "sums": {str(b): v for b, v in self._sums.items()},
                "counts": {str(b): v for b, v in self._counts.items()},
                "history": [[e, c] for e, c in self.history]}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        ints = lambda d, kind: {int(b): kind(v) for b, v in d.items()}  # noqa: E731
        self.epoch = int(state["epoch"])
        self.norms, self.previous = ints(state["norms"], float), ints(state["previous"], float)
        self._sums, self._counts = ints(state["sums"], float), ints(state["counts"], int)
        self.history = [(int(e), list(c)) for e, c in state["history"]]
        self.set_trainable(set(state["trainable"]), optimizer)

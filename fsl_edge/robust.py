"""Robust aggregation: screen the round's adapter deltas, combine them robustly, quarantine repeat offenders.

Every update is checked (all values finite; L2 norm at most `max_norm_ratio` x the median norm
of the round's finite updates), then the rule combines what passed:

- ``none``: FedAvg of the accepted updates (bit for bit `aggregation.fedavg` when all pass);
- ``norm-clip``: an update over the norm bound is scaled down to it instead of dropped;
- ``trimmed-mean``: per coordinate, the `trim` fraction of values at each end is dropped.

The median is robust while fewer than half the updates are bad. With two updates it is their
mean, so neither can exceed twice it: the norm check needs three or more to catch anything.
Everything here is pure; the coordinator keeps `Quarantine`'s state and checkpoints it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .aggregation import State, fedavg
from .config import RobustRule, RobustSettings  # noqa: F401 - settings live with the others (no torch)
from .errors import ConfigError


@dataclass(frozen=True)
class Verdict:
    """What the checks made of one update."""

    status: Literal["accepted", "clipped", "rejected"]
    norm: float
    """Its L2 norm over all tensors (nan or inf if it holds non-finite values)."""
    reason: str = ""
    """Why it was clipped or rejected, for the log and the ledger."""

    @property
    def flagged(self) -> bool:
        """It failed a check (whatever the rule then did with it): a strike towards quarantine."""
        return self.status != "accepted"


@dataclass(frozen=True)
class RobustMean:
    mean: State | None
    """The combined delta; None when no update (or no positive weight) passed: keep the global
    adapter as it is."""
    verdicts: list[Verdict]
    """One per update, in the order given."""
    median_norm: float
    bound: float
    """The norm bound of this round (inf without one)."""


def norm(state: State) -> float:
    """L2 norm of a state dict as one vector, in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in state.values()))


def robust_mean(deltas: Sequence[State], weights: Sequence[float], settings: RobustSettings) -> RobustMean:
    """Screen the round's deltas and combine those that pass as `settings.rule` says.

    Weights are the sites' token counts, as for fedavg. Keys and shapes must agree (ConfigError).
    """
    if not deltas or len(deltas) != len(weights):
        raise ConfigError(f"robust_mean needs one weight per delta, got {len(deltas)} deltas "
                          f"and {len(weights)} weights")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError(f"robust_mean weights must be >= 0 with a positive sum, got {list(weights)}")
    _check_layout(deltas)
    finite = [all(bool(torch.isfinite(t).all()) for t in d.values()) for d in deltas]
    norms = [norm(d) for d in deltas]
    ok_norms = [n for n, f in zip(norms, finite) if f]
    median = statistics.median(ok_norms) if ok_norms else math.nan
    ratio = settings.max_norm_ratio
    bound = ratio * median if ratio is not None and ok_norms else math.inf
    clip = settings.rule is RobustRule.NORM_CLIP
    verdicts, kept, kept_w = [], [], []
    for d, w, n, f in zip(deltas, weights, norms, finite):
        if not f:
            verdicts.append(Verdict("rejected", n, "non-finite values"))
            continue
        if n > bound:
            why = f"norm {n:.4g} > {ratio:g} x median {median:.4g}"
            verdicts.append(Verdict("clipped" if clip else "rejected", n, why))
            if not clip:
                continue
            d = {k: (t.double() * (bound / n)).to(t.dtype) for k, t in d.items()}
        else:
            verdicts.append(Verdict("accepted", n))
        kept.append(d)
        kept_w.append(w)
    mean = None
    if kept and sum(kept_w) > 0:
        mean = (trimmed_mean(kept, kept_w, settings.trim) if settings.rule is RobustRule.TRIMMED_MEAN
                else fedavg(kept, kept_w))
    return RobustMean(mean, verdicts, median, bound)


def trimmed_mean(states: Sequence[State], weights: Sequence[float], trim: float) -> State:
    """Coordinate-wise: drop the floor(trim * n) smallest and largest values, then average the
    rest weighted by their sites' weights.

    Trimming counts values, not weight: weights are self-reported, and counting keeps Yin et
    al.'s guarantee that with at most floor(trim * n) bad updates every coordinate of the result
    lies within the range of the honest values, whatever weights anyone claims. Where the kept
    values all carry weight 0 they are averaged plainly.
    """
    if not 0 <= trim < 0.5:
        raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
    n = len(states)
    cut = math.floor(trim * n)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    out: State = {}
    for k, ref in states[0].items():
        stacked = torch.stack([s[k].to(torch.float64) for s in states])  # (n, *shape)
        values, order = stacked.sort(dim=0, stable=True)
        values, order = values[cut:n - cut], order[cut:n - cut]  # (n - 2 cut, *shape)
        kept_w = w[order]  # each kept value's site weight
        total = kept_w.sum(0)
        weighted = (values * kept_w).sum(0) / total.where(total > 0, torch.ones(()))
        out[k] = torch.where(total > 0, weighted, values.mean(0)).to(ref.dtype)
    return out


def _check_layout(states: Sequence[State]) -> None:
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(ref):
            raise ConfigError(f"update {i} has different keys: {sorted(set(s) ^ set(ref))[:3]}")
        for k, t in s.items():
            if t.shape != ref[k].shape:
                raise ConfigError(f"update {i}: {k} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(ref[k].shape)}")


class Quarantine:
    """Which nodes are excluded from rounds for failing the checks `after` rounds in a row.

    Pure state over round numbers (no clock): `record` the round's verdicts after aggregating,
    ask `excluded(round)` before picking a round's participants. A node quarantined in round r
    sits out rounds r+1 .. r+`rounds` (None: until `lift`). Released nodes start from 0 strikes.
    """

    def __init__(self, after: int = 3, rounds: int | None = None):
        if after < 0 or (rounds is not None and rounds < 1):
            raise ConfigError(f"quarantine needs after >= 0 and rounds >= 1 or None, got {after}, {rounds}")
        self.after, self.rounds = after, rounds
        self.strikes: dict[str, int] = {}  # consecutive flagged updates, per node
        self.terms: dict[str, int | None] = {}  # quarantined node -> last round it sits out

    @classmethod
    def from_settings(cls, settings: RobustSettings) -> Quarantine:
        return cls(settings.quarantine_after, settings.quarantine_rounds)

    def record(self, round: int, flagged: Mapping[str, bool]) -> list[str]:
        """Count each node's update of `round` (True: it failed a check); return who is now
        quarantined. An accepted update clears a node's strikes."""
        newly = []
        for node, bad in flagged.items():
            if node in self.excluded(round):
                continue
            self.strikes[node] = self.strikes.get(node, 0) + 1 if bad else 0
            if self.after and self.strikes[node] >= self.after:
                self.terms[node] = None if self.rounds is None else round + self.rounds
                self.strikes[node] = 0
                newly.append(node)
        return newly

    def excluded(self, round: int) -> set[str]:
        """The nodes that may not take part in `round`."""
        return {n for n, last in self.terms.items() if last is None or round <= last}

    def release(self, round: int) -> list[str]:
        """Forget the terms that ended before `round`; return who was released (for the log)."""
        done = sorted(n for n, last in self.terms.items() if last is not None and round > last)
        for n in done:
            del self.terms[n]
        return done

    def lift(self, node: str) -> bool:
        """An operator's release; False if the node was not quarantined."""
        self.strikes.pop(node, None)
        if node not in self.terms:
            return False
        del self.terms[node]
        return True

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; the settings are not part of it (they come from the configuration)."""
        return {"strikes": dict(self.strikes), "terms": dict(self.terms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            strikes = {str(n): int(s) for n, s in state["strikes"].items()}
            terms = {str(n): None if t is None else int(t) for n, t in state["terms"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"not a quarantine state: {e}") from e
        self.strikes, self.terms = strikes, terms


def aggregate_round(global_: State, deltas: Sequence[State], weights: Sequence[float],
                    settings: RobustSettings, server_lr: float) -> tuple[State, RobustMean]:
    """The next global site adapter from a round's deltas, screened as `settings` says: the one
    rule the coordinator and the simulation both apply (so they agree bit for bit). With no
    delta passing the checks, the global adapter stays as it was."""
    from .aggregation import server_step
    from .compression import advance

    outcome = robust_mean(deltas, weights, settings)
    if outcome.mean is None:
        return global_, outcome
    return advance(global_, outcome.mean, server_step, server_lr), outcome

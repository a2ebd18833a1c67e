"""Aggregation as pure functions over adapter state dicts.

`fedavg` averages site adapters weighted by the tokens each site trained on (FedIT, FlowerTune).
`average_server_copies` is the plain average of several trunk copies; the runtime's SplitFed-V1
(fsl_edge.trunk_copies: a trunk copy per site) weights them by tokens with `fedavg` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ConfigError

State = dict[str, torch.Tensor]


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted average of state dicts with identical keys and shapes; weights need not sum to 1.

    Sums in float64 so that averaging identical adapters returns them bit for bit.
    """
    if not states:
        raise ConfigError("fedavg needs at least one state")
    if len(states) != len(weights):
        raise ConfigError(f"fedavg got {len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError(f"fedavg weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ConfigError(f"state {i} has different keys: {sorted(set(s) ^ keys)[:3]}")
    total = float(sum(weights))
    out: State = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for i, (s, w) in enumerate(zip(states, weights)):
            if s[k].shape != ref.shape:
                raise ConfigError(f"state {i}: {k} has shape {tuple(s[k].shape)}, "
                                  f"expected {tuple(ref.shape)}")
            acc += s[k].to(torch.float64) * w
        out[k] = (acc / total).to(ref.dtype)
    return out


def server_step(previous: State, averaged: State, lr: float) -> State:
    """FedOpt's server step (Reddi et al. 2021) with plain SGD: previous + lr * (averaged - previous).

    lr = 1 is FedAvg itself (returned as is, bit for bit). With N sites doing S local steps each,
    FedAvg moves the global adapter about as far as S steps of one site; lr = N makes a round
    progress like the N sites' steps taken one after another.
    """
    if lr == 1.0:
        return averaged
    if set(previous) != set(averaged):
        raise ConfigError("server_step needs the same keys before and after averaging")
    return {k: (previous[k].double() + lr * (averaged[k].double() - previous[k].double()))
            .to(averaged[k].dtype) for k in averaged}


def average_server_copies(states: Sequence[State]) -> State:
    """SplitFed-V1: the plain average of the trunk adapter copies of the server workers."""
    return fedavg(states, [1.0] * len(states))

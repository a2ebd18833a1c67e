"""What each kind of message is compressed with, and the adapter deltas' error feedback.

Step messages (activations and their gradients) go through a stateless codec pipeline per kind.
Adapters travel as deltas: an agent uploads what it changed since the round's start, the
coordinator sends what changed since the copy the agents hold. A lossy delta keeps what it did
not send (top-k leaves most of it out) and adds it to the next one: error feedback (FLASC,
CELLM), so nothing is lost, only late. The same classes run in the simulation and in the
runtime, which keeps the two equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .codec import STAGES, build_pipeline, decode_tensor, encode_tensor
from .errors import CodecError
from .protocol import Limits

State = dict[str, torch.Tensor]


LOSSLESS = ("raw", "shuffle", "zstd")
INT8 = ("qblock:bits=8,block=64", "zstd")


@dataclass(frozen=True)
class Pipelines:
    activations: tuple[str, ...]
    """activation_up and activation_down (the hidden states at the cuts)."""
    gradients: tuple[str, ...]
    """gradient_up and gradient_down (the gradients of those hidden states)."""
    upload: tuple[str, ...]
    """Adapter deltas from the agents (put `randtopk:k=...` first for top-k)."""
    download: tuple[str, ...]
    """Site adapter deltas to the agents."""
    integers: tuple[str, ...] = ("raw", "zstd")
    """Attention masks and positions: always exact."""

    @property
    def full_download(self) -> tuple[str, ...]:
        """How the site adapter travels in full (first round, resync): exactly."""
        return self.download if is_lossless(self.download) else LOSSLESS


PRESETS: dict[str, Pipelines] = {
    # plain fp32: the baseline every ratio is measured against
    "none": Pipelines(("raw",), ("raw",), ("raw",), ("raw",), ("raw",)),
    # exact: byte-shuffled zstd
    "lossless": Pipelines(LOSSLESS, LOSSLESS, LOSSLESS, LOSSLESS),
    # int4 with the 8 largest channels kept at fp16 (activations in blocks of 32, gradients of
    # 64: bench/comm.py measured these against 64/64, 32/32, outliers 16, stochastic rounding);
    # adapter deltas top-15 % up, top-25 % down, in int8, with error feedback
    "balanced": Pipelines(("qblock:bits=4,block=32,outliers=8", "zstd"),
                          ("qblock:bits=4,block=64,outliers=8", "zstd"),
                          ("randtopk:k=0.15", *INT8), ("randtopk:k=0.25", *INT8)),
    # top-25 % gradients in int4, coarser activation blocks, top-5 % adapter deltas
    "aggressive": Pipelines(("qblock:bits=4,block=128,outliers=8", "zstd"),
                            ("randtopk:k=0.25", "qblock:bits=4,block=64", "zstd"),
                            ("randtopk:k=0.05", *INT8), ("randtopk:k=0.1", *INT8)),
}


def is_lossless(stages: tuple[str, ...]) -> bool:
    """Whether a pipeline gives back exactly what it was given (no cast, quantiser or top-k)."""
    return all(getattr(STAGES.get(s.partition(":")[0]), "lossless", False) for s in stages)


def check_pipeline(stages: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Build it once so a typo fails when the settings load, not at the first message."""
    try:
        build_pipeline(list(stages))
    except CodecError as e:
        raise ValueError(f"{what}: {e}") from e
    return stages


def roundtrip(t: torch.Tensor, stages: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """What the receiver decodes from `t`, and the bytes it cost on the wire."""
    data, meta = encode_tensor(t, stages)
    # the receiver's limit: a serialiser's header and padding may outweigh a tiny tensor
    return decode_tensor(data, meta, Limits().max_tensor_bytes), len(data)


def payload_bytes(state: State, stages: tuple[str, ...]) -> int:
    """What a state dict weighs on the wire through `stages` (tensor payloads only)."""
    return sum(len(encode_tensor(t, stages)[0]) for t in state.values())


class Uplink:
    """An agent's adapter deltas with error feedback: what a lossy upload left out is added to
    the next one. The sum of what was sent and the residual is the sum of the true deltas."""

    def __init__(self, stages: tuple[str, ...]):
        self.stages, self.lossless = stages, is_lossless(stages)
        self.residual: State = {}

    def delta(self, local: State, base: State) -> tuple[State, State]:
        """(what to encode and send, what the coordinator will decode from it)."""
        send, decoded = {}, {}
        for k in local:
            send[k] = local[k] - base[k] + self.residual.get(k, 0)
            decoded[k] = send[k].clone() if self.lossless else roundtrip(send[k], self.stages)[0]
            self.residual[k] = send[k] - decoded[k]
        return send, decoded


class Downlink:
    """The site adapter as the agents hold it (`shared`), kept within reach of the coordinator's
    global adapter by deltas. `shared` trails the global by exactly the download residual, so
    error feedback needs no separate state: the next delta is global - shared."""

    def __init__(self, stages: tuple[str, ...]):
        self.stages, self.lossless = stages, is_lossless(stages)
        self.shared: State | None = None
        self.version = 0

    def advance(self, target: State) -> State | None:
        """Move `shared` towards `target`; return the delta to encode and send, or None when the
        agents get `shared` in full (the first round, or a lossless download: it is exact)."""
        self.version += 1
        if self.shared is None or self.lossless:
            self.shared = {k: v.clone() for k, v in target.items()}
            return None
        send = {k: target[k] - self.shared[k] for k in target}
        self.shared = apply(self.shared, {k: roundtrip(v, self.stages)[0] for k, v in send.items()})
        return send


class StepCodec:
    """Each step message's tensors with the pipeline of its kind; masks and positions lossless."""

    def __init__(self, pipelines: Pipelines):
        self.pipelines = pipelines

    def stages(self, kind: str, t: torch.Tensor) -> tuple[str, ...]:
        if not t.is_floating_point():
            return self.pipelines.integers
        return self.pipelines.activations if kind.startswith("activation") else self.pipelines.gradients

    def through(self, message):
        """The message as its receiver decodes it, and the payload bytes it cost."""
        decoded, sent = {}, 0
        for name, t in message.tensors().items():
            decoded[name], n = roundtrip(t, self.stages(message.kind, t))
            sent += n
        return dataclasses.replace(message, **decoded), sent


def apply(base: State, delta: State) -> State:
    """base + delta, the one way both sides compute it (so they agree bit for bit)."""
    return {k: base[k] + delta[k] for k in base}


def aggregate(global_: State, deltas: list[State], weights: list[float],
              average: Callable[[list[State], list[float]], State],
              step: Callable[[State, State, float], State], lr: float) -> State:
    """The next global site adapter: the weighted mean delta, applied to the global adapter (not
    to the copy the agents trained from: what the download left out is not lost)."""
    return advance(global_, average(deltas, weights), step, lr)


def advance(global_: State, mean_delta: State, step: Callable[[State, State, float], State],
            lr: float) -> State:
    """The next global site adapter from a mean delta computed elsewhere (robust.robust_mean)."""
    return step(global_, apply(global_, mean_delta), lr)

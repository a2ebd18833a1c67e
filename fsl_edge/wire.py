"""Step messages and adapters <-> protocol envelopes, with the checks a receiver needs.

The tensors of a message travel under their field names; non-tensor fields (the vanilla loss)
travel in the JSON meta. A receiver states the shapes it expects, so a wrong shape or dtype
is refused before the tensor is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compression import LOSSLESS, PRESETS, StepCodec
from .errors import ProtocolError
from .messages import ActivationDown, ActivationUp, GradientDown, GradientUp
from .protocol import Envelope, MessageKind

STEP_MESSAGES = {MessageKind.ACTIVATION_UP: ActivationUp, MessageKind.ACTIVATION_DOWN: ActivationDown,
                 MessageKind.GRADIENT_UP: GradientUp, MessageKind.GRADIENT_DOWN: GradientDown}
DEFAULT_CODEC = StepCodec(PRESETS["lossless"])


@dataclass(frozen=True)
class Address:
    run: str
    agent: str
    round: int
    step: int = 0


def kind_of(message) -> MessageKind:
    return MessageKind[message.kind.upper()]


def raw_bytes(env: Envelope) -> int:
    """What the envelope's tensors weigh uncompressed."""
    return sum(t.meta.nbytes for t in env.tensors)


def step_envelope(message, at: Address, codec: StepCodec = DEFAULT_CODEC) -> Envelope:
    """Wrap a step message (ActivationUp, ...) for the wire, compressed as `codec` says."""
    env = Envelope(kind_of(message), at.run, at.agent, at.round, at.step)
    for name, t in message.tensors().items():
        env.add_tensor(name, t, codec.stages(message.kind, t))
    for name, kind in message.META.items():
        value = getattr(message, name)
        if value is not None:
            env.meta[name] = kind(value)
    return env


def step_message(env: Envelope, max_tensor_bytes: int):
    """Unwrap a step message; ProtocolError if a tensor is missing or of the wrong type."""
    cls = STEP_MESSAGES.get(env.kind)
    if cls is None:
        raise ProtocolError(f"{env.kind.name} is not a step message")
    tensors = env.tensor_dict(max_tensor_bytes)
    fields = {"hidden", "grad", "attention_mask", "position_ids", "labels", "keys"}
    unknown = set(tensors) - fields
    if unknown:
        raise ProtocolError(f"{env.kind.name} carries unknown tensors {sorted(unknown)}")
    for name in ("attention_mask", "position_ids", "labels", "keys"):
        if name in tensors and tensors[name].dtype != torch.int64:
            raise ProtocolError(f"{name} has dtype {tensors[name].dtype}, expected torch.int64")
    if cls is ActivationUp:
        tensors.setdefault("hidden", None)  # keys may stand for it (validate checks which)
    if cls is GradientDown:
        tensors.setdefault("grad", None)  # a site whose front does not train gets none
    try:
        message = cls(**tensors)
    except TypeError as e:
        raise ProtocolError(f"{env.kind.name} is missing a tensor: {e}") from e
    for name, kind in cls.META.items():
        if name in env.meta:
            setattr(message, name, meta_value(env.meta, name, kind))
    return message


def meta_value(meta: dict, key: str, kind: type):
    """A typed field from an envelope's JSON meta, or ProtocolError naming it."""
    if kind in (int, float):
        return meta_number(meta, key, kind)
    value = meta.get(key)
    if not isinstance(value, kind) or (kind is str and len(value) > 256):
        raise ProtocolError(f"meta field {key!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def meta_number(meta: dict, key: str, kind: type, minimum: float | None = None):
    """A finite number from an envelope's JSON meta, or ProtocolError naming the field."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)) or not math.isfinite(value):
        raise ProtocolError(f"meta field {key!r} must be a finite {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProtocolError(f"meta field {key!r} must be >= {minimum}, got {value!r}")
    return kind(value)


def adapter_envelope(kind: MessageKind, state: dict[str, torch.Tensor], at: Address,
                     meta: dict | None = None, stages: tuple[str, ...] = LOSSLESS) -> Envelope:
    env = Envelope(kind, at.run, at.agent, at.round, at.step, meta=dict(meta or {}))
    for name, t in state.items():
        env.add_tensor(name, t, stages)
    return env


def adapter_state(env: Envelope, expected: dict[str, torch.Tensor], max_tensor_bytes: int):
    """Decode an adapter and check it against the expected keys, shapes and finiteness."""
    state = env.tensor_dict(max_tensor_bytes)
    if set(state) != set(expected):
        missing, unknown = set(expected) - set(state), set(state) - set(expected)
        raise ProtocolError(f"adapter does not match: missing {sorted(missing)[:3]}, "
                            f"unknown {sorted(unknown)[:3]}")
    for name, t in state.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise ProtocolError(f"adapter tensor {name} is {t.dtype} {tuple(t.shape)}, expected "
                                f"{expected[name].dtype} {tuple(expected[name].shape)}")
        if not torch.isfinite(t).all():
            raise ProtocolError(f"adapter tensor {name} has non-finite values")
    return state

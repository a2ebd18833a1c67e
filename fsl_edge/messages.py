"""The tensors that cross the cut, one dataclass per hop of a split training step.

These are exactly what the runtime puts on the wire (the protocol module wraps them in an
envelope); the in-process loop passes the same objects by reference. `tensors()` lists every
tensor a message carries, which is what the byte accounting and the privacy test look at.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .errors import ProtocolError

# Message kinds for byte accounting (per hop of a step, and the adapters once per round).
ACTIVATION_UP, ACTIVATION_DOWN = "activation_up", "activation_down"
GRADIENT_UP, GRADIENT_DOWN = "gradient_up", "gradient_down"
ADAPTER_UP, ADAPTER_DOWN = "adapter_up", "adapter_down"
KINDS = (ACTIVATION_UP, ACTIVATION_DOWN, GRADIENT_UP, GRADIENT_DOWN, ADAPTER_UP, ADAPTER_DOWN)


class _Message:
    kind: str
    # plain (non-tensor) fields that travel in the envelope's JSON meta, with their types
    META: dict[str, type] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def check_hidden(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dim() != 3 or tuple(t.shape) != shape:
        raise ProtocolError(f"{name} has shape {tuple(t.shape)}, expected {shape} (B, T, C)")
    if not t.is_floating_point():
        raise ProtocolError(f"{name} has dtype {t.dtype}, expected a floating-point tensor")
    if not torch.isfinite(t).all():
        raise ProtocolError(f"{name} contains non-finite values")


@dataclass
class ActivationUp(_Message):
    """Site -> server: the output of the site's front blocks at cut a.

    With keys (prefix.send_keys), `keys` name the samples in the site's data and `prefix` the
    fingerprint of the frozen prefix that computed them: with `hidden` the server keeps a copy
    per key; without it, the server uses the copies it kept."""

    hidden: torch.Tensor | None  # (B, T, C); None when the keys stand for it
    attention_mask: torch.Tensor  # (B, T), 1 = token, 0 = padding: the server's masks need it
    position_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor | None = None  # (B, T), vanilla only: this is the text, shifted
    keys: torch.Tensor | None = None  # (B,) int64: the samples' indices in the site's data
    prefix: str | None = None  # fingerprint of the prefix the keys' activations come from
    need_grad: bool = True  # False: nothing below the cut trains, send no gradient back
    epoch: int = 0  # the site's epoch: the server re-selects its layers when it advances
    a: int | None = None  # the site's cut: the trunk runs [a, b) for it (None: the server's own)
    b: int | None = None
    kind = ACTIVATION_UP
    META = {"prefix": str, "need_grad": bool, "epoch": int, "a": int, "b": int}

    def validate(self, hidden_size: int) -> None:
        """Reject a message whose shapes or values cannot be what a site computes."""
        if self.attention_mask.dim() != 2:
            raise ProtocolError(f"attention_mask has shape {tuple(self.attention_mask.shape)}, "
                                "expected (B, T)")
        B, T = self.attention_mask.shape
        if self.keys is not None:
            if tuple(self.keys.shape) != (B,) or self.keys.dtype != torch.int64 or (self.keys < 0).any():
                raise ProtocolError(f"keys must be {B} non-negative int64, got {self.keys.dtype} "
                                    f"{tuple(self.keys.shape)}")
            if not self.prefix:
                raise ProtocolError("keys come without the fingerprint of their prefix")
        elif self.hidden is None:
            raise ProtocolError("an activation without hidden states needs keys")
        if self.hidden is not None:
            check_hidden("hidden", self.hidden, (B, T, hidden_size))
        if ((self.attention_mask != 0) & (self.attention_mask != 1)).any():
            raise ProtocolError("attention_mask holds values other than 0 and 1")
        for name in ("position_ids", "labels"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (B, T):
                raise ProtocolError(f"{name} has shape {tuple(t.shape)}, expected {(B, T)}")


@dataclass
class ActivationDown(_Message):
    """Server -> site (u-shape): the output of the server's trunk at cut b."""

    hidden: torch.Tensor  # (B, T, C)
    kind = ACTIVATION_DOWN


@dataclass
class GradientUp(_Message):
    """Site -> server (u-shape): d loss / d (trunk output)."""

    grad: torch.Tensor  # (B, T, C)
    kind = GRADIENT_UP

    def validate(self, shape: tuple[int, ...]) -> None:
        check_hidden("grad", self.grad, shape)


@dataclass
class GradientDown(_Message):
    """Server -> site: d loss / d (site front output), None when the site said it needs none.
    Vanilla also carries the loss it computed."""

    grad: torch.Tensor | None  # (B, T, C)
    loss: float | None = None
    kind = GRADIENT_DOWN
    META = {"loss": float}

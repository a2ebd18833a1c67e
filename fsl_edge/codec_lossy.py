"""The lossy codec stages: casts, block-wise int8/int4 quantisation, randomized top-k.

Registered into `codec.STAGES` on import (codec.py imports this module), so any pipeline can name
them and any receiver can decode them from the specs in the envelope.

Randomness (stochastic rounding, the random part of top-k) is seeded from the crc32 of the
tensor's own bytes: the same tensor is always encoded the same way, so the in-process simulation
and a distributed run make identical choices, while different tensors get different draws.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from .codec import DTYPES, Layout, Serialiser, TensorStage, dtype_name, register_stage

FLOATS = ("float32", "float16", "bfloat16")


def _generator(t: torch.Tensor) -> torch.Generator:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return torch.Generator().manual_seed(zlib.crc32(data.numpy().tobytes()))


@register_stage
class Cast(TensorStage):
    """fp32 -> bf16/fp16 before serialising; the decoder casts back to the sender's dtype."""

    name = "cast"

    def __init__(self, to: str = "bfloat16"):
        if to not in FLOATS:
            raise ValueError(f"to must be one of {', '.join(FLOATS)}, got {to!r}")
        self.to = to

    def wire_spec(self) -> str:
        return f"cast:to={self.to}"

    def layout_after(self, layout: Layout) -> Layout:
        if layout.dtype not in FLOATS:
            raise self.fail(f"casts floating-point tensors only, not {layout.dtype}")
        return Layout(self.to, layout.shape)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            raise self.fail(f"casts floating-point tensors only, not {t.dtype}")
        # saturate rather than overflow to inf, which every receiver would refuse
        big = torch.finfo(DTYPES[self.to][0]).max
        if torch.finfo(t.dtype).max > big:
            t = t.clamp(-big, big)
        return t.to(DTYPES[self.to][0])

    def decode(self, t: torch.Tensor, target: Layout) -> torch.Tensor:
        if dtype_name(t.dtype) != self.to:
            raise self.fail(f"expected {self.to} from the serialiser, got {t.dtype}")
        return t.to(DTYPES[target.dtype][0])


@register_stage
class RandTopk(TensorStage):
    """Sparsify: keep the top `k` fraction by magnitude; keep each other element with probability
    `p`, scaled by 1/p, so the sum over the rest is estimated without bias (RandTopk-style).

    The tensor stays dense with zeros (decode is the identity): a quantiser and zstd after it
    turn the zeros into almost nothing, and each stage stays simple and composable.
    """

    name = "randtopk"

    def __init__(self, k: float = 0.1, p: float = 0.0):
        if not 0 < k <= 1 or not 0 <= p <= 1:
            raise ValueError(f"k must be in (0, 1] and p in [0, 1], got k={k!r}, p={p!r}")
        self.k, self.p = float(k), float(p)

    def wire_spec(self) -> str:
        return "randtopk"  # the decoder needs nothing: the zeros are the sparsity

    def layout_after(self, layout: Layout) -> Layout:
        if layout.dtype not in FLOATS:
            raise self.fail(f"sparsifies floating-point tensors only, not {layout.dtype}")
        return layout

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():  # else torch fails first, with NotImplementedError on bool
            raise self.fail(f"sparsifies floating-point tensors only, not {t.dtype}")
        flat = t.reshape(-1)
        n = flat.numel()
        keep = min(n, max(1, math.ceil(self.k * n))) if n else 0
        mask = torch.zeros(n, dtype=torch.bool)
        if keep:
            mask[flat.abs().float().topk(keep, sorted=False).indices] = True
        out = torch.where(mask, flat, torch.zeros((), dtype=t.dtype))
        if self.p > 0 and keep < n:
            lucky = (torch.rand(n, generator=_generator(t)) < self.p) & ~mask
            # scaled in float32 and kept finite: 1/p can push a half-precision value past its max
            big = torch.finfo(t.dtype).max
            scaled = (flat.float() / self.p).clamp(-big, big).to(t.dtype)
            out = torch.where(lucky, scaled, out)
        return out.reshape(t.shape)

    def decode(self, t: torch.Tensor, target: Layout) -> torch.Tensor:
        return t


_HEADER = struct.Struct("<BBHI")  # bits, outlier precision (0 fp16, 1 fp32), block, outliers
FP16_MAX = torch.finfo(torch.float16).max


@register_stage
class QBlock(Serialiser):
    """Block-wise absmax quantisation to int8 or int4 with one bf16 scale per `block` elements.

    Blocks run along the flattened tensor, i.e. along the last (channel) dimension for
    activations. Outlier channels (LLM activations have a few channels 100x larger than the
    rest) would blow up every block they sit in: `outliers=n` sends the n channels of largest
    magnitude at fp16 instead. `sr=1` rounds stochastically (unbiased, error < one step instead
    of half a step). Payload: header, outlier channel ids (int32) and values (fp16), scales
    (bf16), then the codes (int8, or two int4 per byte).
    """

    name = "qblock"

    def __init__(self, bits: int = 8, block: int = 64, outliers: int = 0, sr: int = 0):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if not isinstance(block, int) or not 8 <= block <= 65535 or block % 2:
            raise ValueError(f"block must be an even int in [8, 65535], got {block!r}")
        if not isinstance(outliers, int) or outliers < 0:
            raise ValueError(f"outliers must be an int >= 0, got {outliers!r}")
        self.bits, self.block, self.outliers, self.sr = bits, block, outliers, bool(sr)
        self.qmax = 127 if bits == 8 else 7

    def wire_spec(self) -> str:
        return f"qblock:bits={self.bits},block={self.block}"  # the rest is in the payload

    def encode(self, t: torch.Tensor) -> bytes:
        if not t.is_floating_point():
            raise self.fail(f"quantises floating-point tensors only, not {t.dtype}")
        x = t.detach().float()
        if not torch.isfinite(x).all():
            raise self.fail("cannot quantise non-finite values")
        channels = x.shape[-1] if x.dim() else 1
        rows = x.reshape(-1, channels) if x.numel() else x.reshape(0, channels)
        n_out = min(self.outliers, channels) if rows.shape[0] else 0
        ids = torch.zeros(0, dtype=torch.int32)
        kept = torch.zeros(0, dtype=torch.float16)
        if n_out:
            ids = rows.abs().amax(0).topk(n_out).indices.sort().values.to(torch.int32)
            kept = rows[:, ids.long()]
            # fp16 where it holds them; float32 for outliers beyond its range (code 1)
            kept = kept.to(torch.float16) if kept.abs().max() <= FP16_MAX else kept
            rows = rows.clone()
            rows[:, ids.long()] = 0
        flat = rows.reshape(-1)
        pad = (-flat.numel()) % self.block
        blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, self.block)
        # the scale is rounded up to bf16, so no code ever needs clamping
        scale = (blocks.abs().amax(1) / self.qmax * (1 + 2 ** -7)).to(torch.bfloat16)
        s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        y = blocks / s
        if self.sr:
            y = torch.floor(y + torch.rand(y.shape, generator=_generator(t)))
        else:
            y = torch.round(y)
        codes = y.clamp(-self.qmax, self.qmax).to(torch.int8).reshape(-1)
        if self.bits == 4:
            nib = (codes + 8).to(torch.uint8).reshape(-1, 2)
            codes = (nib[:, 0] | (nib[:, 1] << 4))
        code = 0 if kept.dtype == torch.float16 else 1
        return b"".join((_HEADER.pack(self.bits, code, self.block, n_out), ids.numpy().tobytes(),
                         kept.numpy().tobytes(), scale.view(torch.int16).numpy().tobytes(),
                         codes.numpy().tobytes()))

    def decode(self, data: bytes | memoryview, layout: Layout, max_bytes: int) -> torch.Tensor:
        if layout.dtype not in FLOATS:
            raise self.fail(f"decodes to floating-point tensors only, not {layout.dtype}")
        numel = math.prod(layout.shape)
        if numel * 4 > max_bytes:  # decoding goes through float32
            raise self.fail(f"{numel} elements exceed the limit of {max_bytes} bytes")
        if len(data) < _HEADER.size:
            raise self.fail(f"payload of {len(data)} bytes is shorter than the header")
        bits, code, block, n_out = _HEADER.unpack_from(data)
        if code not in (0, 1):
            raise self.fail(f"unknown outlier precision code {code}")
        outlier = "<f2" if code == 0 else "<f4"
        if (bits, block) != (self.bits, self.block):
            raise self.fail(f"payload says bits={bits}, block={block}; the spec says "
                            f"bits={self.bits}, block={self.block}")
        channels = layout.shape[-1] if layout.shape else 1
        n_rows = numel // channels if channels else 0
        if n_out > channels or (n_out and not n_rows):
            raise self.fail(f"{n_out} outlier channels in a tensor of {channels} channels")
        n_blocks = -(-numel // block)
        code_bytes = n_blocks * block * (1 if bits == 8 else 0.5)
        expected = _HEADER.size + 4 * n_out + (2 + 2 * code) * n_out * n_rows + 2 * n_blocks \
            + int(code_bytes)
        if len(data) != expected:
            raise self.fail(f"payload has {len(data)} bytes, {layout.shape} with {n_out} outlier "
                            f"channels needs {expected}")
        at = _HEADER.size
        buf = np.frombuffer(data, dtype=np.uint8)

        def take(count: int, dtype: str) -> np.ndarray:
            nonlocal at
            arr = buf[at:at + count * np.dtype(dtype).itemsize].view(dtype)
            at += count * np.dtype(dtype).itemsize
            return arr

        ids = torch.from_numpy(take(n_out, "<i4").astype(np.int64))
        kept = torch.from_numpy(take(n_out * n_rows, outlier).astype(np.float32))
        scale = torch.from_numpy(take(n_blocks, "<i2").copy()).view(torch.bfloat16).float()
        raw = torch.from_numpy(take(int(code_bytes), "u1").copy())
        if bits == 4:
            codes = torch.stack([raw & 15, raw >> 4], 1).reshape(-1).to(torch.int16) - 8
        else:
            codes = raw.view(torch.int8).to(torch.int16)
        if codes.abs().max().item() > self.qmax if codes.numel() else False:
            raise self.fail(f"a code is outside [-{self.qmax}, {self.qmax}]")
        if not torch.isfinite(scale).all() or not torch.isfinite(kept).all():
            raise self.fail("non-finite scale or outlier value")
        if n_out and ((ids < 0).any() or (ids >= channels).any() or len(set(ids.tolist())) != n_out):
            raise self.fail(f"outlier channel ids must be distinct and in [0, {channels})")
        x = (codes.reshape(n_blocks, block).float() * scale[:, None]).reshape(-1)[:numel]
        if n_out:
            x = x.reshape(n_rows, channels)
            x[:, ids] = kept.reshape(n_rows, n_out)
        # the bf16 scale is rounded up, so a value at the dtype's very max may decode a step past it
        dtype = DTYPES[layout.dtype][0]
        big = torch.finfo(dtype).max
        return x.reshape(layout.shape).clamp(-big, big).to(dtype)

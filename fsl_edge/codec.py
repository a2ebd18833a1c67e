"""Tensors <-> bytes through a pipeline of named stages; no pickle anywhere.

A pipeline is a list of stage specs, e.g. ``["raw", "shuffle", "zstd:level=3"]``, in three
phases, in this order:

1. tensor stages (tensor -> tensor: casts, later quantisation helpers), any number;
2. exactly one serialiser (tensor -> bytes: ``raw``, later block-quantisers and sparsifiers);
3. byte stages (bytes -> bytes: ``shuffle``, ``zstd``), any number.

Each stage's ``wire_spec`` is recorded in ``TensorMeta.stages``, so the receiver rebuilds the
pipeline without out-of-band knowledge. Parameters a decoder needs belong in the wire spec;
parameters only the encoder needs (the zstd level) are left out of it.
Decoding never allocates more than ``max_bytes`` for any intermediate buffer, and every stage
validates its input and raises ``CodecError`` naming itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import zstandard

from fsl_edge.errors import CodecError

# name -> (torch dtype, little-endian numpy dtype of the bytes on the wire). bfloat16 has no numpy
# dtype: its bits travel as int16 and are viewed back as bfloat16.
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("?")),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
MAX_NDIM = 64  # decode_tensor's own bound; the protocol's Limits.max_ndim is tighter


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of a torch dtype; CodecError if it cannot travel."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise CodecError(f"codec: dtype {dtype} is not supported on the wire; use one of {sorted(DTYPES)}") from None


def itemsize(name: str) -> int:
    return DTYPES[name][1].itemsize


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs besides the payload: the tensor's dtype and shape, and the stages."""

    dtype: str
    shape: tuple[int, ...]
    stages: tuple[str, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the decoded tensor; checked against the caller's limit before decoding."""
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class Layout:
    """The dtype and shape of the tensor at one point of the pipeline."""

    dtype: str
    shape: tuple[int, ...]


class Stage(ABC):
    """A named, registered codec step. Subclass one of the three phases below.

    A decoder builds stages from specs that came over the wire: constructors must validate their
    parameters (raise ValueError), and decode methods must check sizes before allocating.
    """

    name: ClassVar[str]
    phase: ClassVar[int]
    lossless: ClassVar[bool] = False  # decode(encode(x)) == x bit for bit

    def wire_spec(self) -> str:
        """The spec recorded in the envelope; add the parameters a decoder needs."""
        return self.name

    def fail(self, problem: str) -> CodecError:
        return CodecError(f"codec stage '{self.name}': {problem}")


class TensorStage(Stage):
    phase = 1

    def layout_after(self, layout: Layout) -> Layout:
        return layout

    @abstractmethod
    def encode(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, t: torch.Tensor, target: Layout) -> torch.Tensor: ...


class Serialiser(Stage):
    phase = 2

    @abstractmethod
    def encode(self, t: torch.Tensor) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes | memoryview, layout: Layout, max_bytes: int) -> torch.Tensor: ...


class ByteStage(Stage):
    phase = 3

    @abstractmethod
    def encode(self, data: bytes | memoryview, layout: Layout) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes | memoryview, layout: Layout, max_bytes: int) -> bytes | memoryview: ...


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available by its name to encoders and decoders."""
    if cls.name in STAGES:
        raise ValueError(f"codec stage '{cls.name}' is registered twice")
    STAGES[cls.name] = cls
    return cls


def make_stage(spec: str) -> Stage:
    """Build a stage from ``name`` or ``name:key=value,key=value`` (values int, float or str)."""
    name, _, arg_text = spec.partition(":")
    cls = STAGES.get(name)
    if cls is None:
        raise CodecError(f"codec: unknown stage '{name}' (known: {', '.join(sorted(STAGES))})")
    kwargs: dict[str, Any] = {}
    for item in filter(None, arg_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise CodecError(f"codec stage '{name}': bad parameter '{item}', expected key=value")
        kwargs[key] = _parse_value(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CodecError(f"codec stage '{name}': bad parameters {kwargs}: {e}") from e


def _parse_value(text: str) -> int | float | str:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def build_pipeline(specs: list[str | Stage] | tuple[str | Stage, ...]) -> list[Stage]:
    """Turn specs into stages and check the phase order (tensor*, serialiser, bytes*)."""
    stages = [s if isinstance(s, Stage) else make_stage(s) for s in specs]
    phases = [s.phase for s in stages]
    if phases.count(2) != 1 or phases != sorted(phases):
        names = [s.name for s in stages]
        raise CodecError(
            f"codec: pipeline {names} must be tensor stages, then exactly one serialiser "
            f"({', '.join(n for n, c in STAGES.items() if c.phase == 2)}), then byte stages"
        )
    return stages


def encode_tensor(t: torch.Tensor, stages: list[str | Stage] | tuple[str | Stage, ...] = ("raw",)) -> tuple[bytes, TensorMeta]:
    """Encode a tensor through the pipeline; return the payload and the meta to send with it."""
    pipeline = build_pipeline(stages)
    meta = TensorMeta(dtype_name(t.dtype), tuple(t.shape), tuple(s.wire_spec() for s in pipeline))
    layout = Layout(meta.dtype, meta.shape)
    x: Any = t.detach().cpu()
    for stage in pipeline:
        if isinstance(stage, ByteStage):
            x = stage.encode(x, layout)
        else:
            x = stage.encode(x)
            if isinstance(stage, TensorStage):
                layout = stage.layout_after(layout)
    return bytes(x), meta


def decode_tensor(data: bytes | memoryview, meta: TensorMeta, max_bytes: int) -> torch.Tensor:
    """Decode a payload; CodecError (naming the stage) if it is malformed or larger than max_bytes."""
    if meta.dtype not in DTYPES:
        raise CodecError(f"codec: unknown dtype '{meta.dtype}' (known: {', '.join(DTYPES)})")
    if any(d < 0 for d in meta.shape):
        raise CodecError(f"codec: negative dimension in shape {meta.shape}")
    if len(meta.shape) > MAX_NDIM:
        raise CodecError(f"codec: {len(meta.shape)} dimensions, at most {MAX_NDIM} are decoded")
    if meta.nbytes > max_bytes:
        raise CodecError(f"codec: tensor of shape {meta.shape} {meta.dtype} needs {meta.nbytes} bytes > limit {max_bytes}")
    # An empty tensor (a 0 in its shape) must not declare dimensions no non-empty one could have
    # within the limit: torch cannot hold them (reshape to (0, 2**64 - 1) raises TypeError).
    if math.prod(max(d, 1) for d in meta.shape) * itemsize(meta.dtype) > max_bytes:
        raise CodecError(f"codec: empty tensor of shape {meta.shape} {meta.dtype} has dimensions "
                         f"beyond the limit of {max_bytes} bytes")
    pipeline = build_pipeline(list(meta.stages))
    # The layout each stage saw when encoding is re-derived forwards; decoding then runs backwards.
    layouts = [Layout(meta.dtype, meta.shape)]
    for stage in pipeline:
        layouts.append(stage.layout_after(layouts[-1]) if isinstance(stage, TensorStage) else layouts[-1])
    x: Any = data
    for stage, layout in zip(reversed(pipeline), reversed(layouts[:-1])):
        x = stage.decode(x, layout, max_bytes) if not isinstance(stage, TensorStage) else stage.decode(x, layout)
    if _NAME_OF.get(x.dtype) != meta.dtype or tuple(x.shape) != meta.shape:
        raise CodecError(f"codec: decoded {x.dtype} {tuple(x.shape)}, expected {meta.dtype} {meta.shape}")
    return x


@register_stage
class Raw(Serialiser):
    """Contiguous little-endian element buffer; dtype and shape travel in TensorMeta."""

    name = "raw"
    lossless = True

    def encode(self, t: torch.Tensor) -> bytes:
        wire = DTYPES[dtype_name(t.dtype)][1]
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.contiguous().numpy().astype(wire, copy=False).tobytes()

    def decode(self, data: bytes | memoryview, layout: Layout, max_bytes: int) -> torch.Tensor:
        torch_dtype, wire = DTYPES[layout.dtype]
        expected = math.prod(layout.shape) * wire.itemsize
        if len(data) != expected:
            raise self.fail(f"payload has {len(data)} bytes, shape {layout.shape} {layout.dtype} needs {expected}")
        if expected > max_bytes:
            raise self.fail(f"{expected} bytes exceed the limit {max_bytes}")
        arr = np.frombuffer(data, dtype=wire)
        if layout.dtype == "bool" and arr.view(np.uint8).max(initial=0) > 1:
            raise self.fail("bool payload holds bytes other than 0 and 1")
        # One copy: to native byte order and writable memory that torch may own.
        arr = arr.astype(wire.newbyteorder("="), copy=True)
        t = torch.from_numpy(arr)
        if torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape(layout.shape)


@register_stage
class Shuffle(ByteStage):
    """Group byte k of every element together: exponents line up, so zstd finds runs in floats."""

    name = "shuffle"
    lossless = True

    def encode(self, data: bytes | memoryview, layout: Layout) -> bytes:
        return _shuffle(data, itemsize(layout.dtype), inverse=False)

    def decode(self, data: bytes | memoryview, layout: Layout, max_bytes: int) -> bytes:
        if len(data) > max_bytes:
            raise self.fail(f"{len(data)} bytes exceed the limit {max_bytes}")
        return _shuffle(data, itemsize(layout.dtype), inverse=True)


def _shuffle(data: bytes | memoryview, size: int, inverse: bool) -> bytes:
    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(buf) // size
    if size == 1 or n == 0:
        return bytes(buf)
    body = buf[: n * size].reshape((size, n) if inverse else (n, size))
    # A tail shorter than one element (only from a serialiser with a header) stays in place.
    return body.T.tobytes() + buf[n * size :].tobytes()


@register_stage
class Zstd(ByteStage):
    """zstandard; the frame always declares its size so a decoder can refuse a bomb up front."""

    name = "zstd"
    lossless = True

    def __init__(self, level: int = 3):
        if not isinstance(level, int) or not -7 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"level must be an int in [-7, {zstandard.MAX_COMPRESSION_LEVEL}], got {level!r}")
        self.level = level

    def encode(self, data: bytes | memoryview, layout: Layout) -> bytes:
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(data)

    def decode(self, data: bytes | memoryview, layout: Layout, max_bytes: int) -> bytes:
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise self.fail(f"not a zstd frame ({e})") from e
        if size < 0:
            raise self.fail("frame does not declare its decompressed size; refusing to guess")
        if size > max_bytes:
            raise self.fail(f"frame declares {size} decompressed bytes > limit {max_bytes}")
        try:
            # max_output_size bounds the allocation even if the size field above were wrong.
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes)
        except zstandard.ZstdError as e:
            raise self.fail(f"corrupt frame ({e})") from e
        if len(out) != size:
            raise self.fail(f"frame declared {size} bytes but held {len(out)}")
        return out



from . import codec_lossy  # noqa: E402,F401 - registers the lossy stages; it needs the classes above

"""Round trips for every dtype and stage pipeline, and decoders that refuse lying or hostile input."""

import itertools

import pytest
import torch
import zstandard

from fsl_edge import codec
from fsl_edge.codec import TensorMeta, decode_tensor, encode_tensor
from fsl_edge.errors import CodecError

MiB = 1 << 20
PIPELINES = [
    ("raw",),
    ("raw", "shuffle"),
    ("raw", "zstd"),
    ("raw", "shuffle", "zstd"),
    ("raw", "shuffle", "zstd:level=9"),
    ("raw", "zstd:level=-3", "shuffle"),  # any byte-stage order must still invert
]


def sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", sorted(codec.DTYPES))
@pytest.mark.parametrize("stages", PIPELINES, ids="+".join)
def test_round_trip_every_dtype_and_pipeline(name, stages):
    t = sample(codec.DTYPES[name][0])
    payload, meta = encode_tensor(t, stages)
    assert meta.dtype == name and meta.shape == (3, 5, 7)
    out = decode_tensor(payload, meta, max_bytes=MiB)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(out, t)  # bit-identical, no tolerance: every baseline stage is lossless


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3), (1,), (13,)], ids=str)
def test_round_trip_edge_shapes(shape):
    t = sample(torch.float32, shape)
    payload, meta = encode_tensor(t, ("raw", "shuffle", "zstd"))
    assert torch.equal(decode_tensor(payload, meta, max_bytes=MiB), t)


def test_special_floats_and_noncontiguous_input_survive():
    t = torch.tensor([[float("nan"), float("inf")], [-float("inf"), -0.0]]).t()  # transposed: not contiguous
    out = decode_tensor(*encode_tensor(t, ("raw", "shuffle", "zstd")), max_bytes=MiB)
    assert torch.equal(out.view(torch.int32), t.contiguous().view(torch.int32))  # same bits, NaN included


def test_raw_is_little_endian_and_explicit():
    payload, meta = encode_tensor(torch.tensor([1, 256], dtype=torch.int32))
    assert payload == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert meta == TensorMeta("int32", (2,), ("raw",))


def test_bfloat16_travels_as_its_own_bits():
    t = torch.tensor([1.0, -2.5, 3e38], dtype=torch.bfloat16)
    payload, _ = encode_tensor(t)
    assert payload == t.view(torch.int16).numpy().astype("<i2").tobytes()


def test_shuffle_helps_zstd_on_floats():
    # Several zstd blocks (128 KiB each): shuffled, the low-entropy exponent bytes get blocks and
    # Huffman tables of their own. On one block the byte histogram, hence the size, is the same.
    t = torch.randn(1 << 20).to(torch.float16)
    plain, _ = encode_tensor(t, ("raw", "zstd"))
    shuffled, _ = encode_tensor(t, ("raw", "shuffle", "zstd"))
    assert len(shuffled) < 0.95 * len(plain)


def test_wire_spec_keeps_only_what_the_decoder_needs():
    _, meta = encode_tensor(torch.ones(4), ("raw", "zstd:level=19"))
    assert meta.stages == ("raw", "zstd")


@pytest.mark.parametrize(
    "stages, message",
    [
        (("raw", "lz4"), "unknown stage 'lz4'"),
        (("zstd",), "exactly one serialiser"),
        (("raw", "raw"), "exactly one serialiser"),
        (("shuffle", "raw"), "exactly one serialiser"),
        (("raw", "zstd:level=99"), "codec stage 'zstd': bad parameters"),
        (("raw", "zstd:level"), "codec stage 'zstd': bad parameter 'level'"),
        (("raw", "zstd:colour=3"), "codec stage 'zstd': bad parameters"),
    ],
)
def test_bad_pipelines_are_refused(stages, message):
    with pytest.raises(CodecError, match=message):
        encode_tensor(torch.ones(2), stages)
    with pytest.raises(CodecError, match=message):
        decode_tensor(b"", TensorMeta("float32", (2,), stages), max_bytes=MiB)


def test_unsupported_dtype_is_refused():
    with pytest.raises(CodecError, match="float64 is not supported"):
        encode_tensor(torch.ones(2, dtype=torch.float64))


def test_lying_shape_is_caught_by_raw():
    payload, _ = encode_tensor(torch.ones(10))
    with pytest.raises(CodecError, match=r"codec stage 'raw': payload has 40 bytes, shape \(11,\) float32 needs 44"):
        decode_tensor(payload, TensorMeta("float32", (11,), ("raw",)), max_bytes=MiB)


def test_lying_dtype_is_caught_by_raw():
    payload, _ = encode_tensor(torch.ones(10))
    with pytest.raises(CodecError, match="codec stage 'raw'"):
        decode_tensor(payload, TensorMeta("float16", (10,), ("raw",)), max_bytes=MiB)


def test_declared_size_over_limit_is_refused_before_decoding():
    with pytest.raises(CodecError, match="needs 4294967296 bytes > limit"):
        decode_tensor(b"", TensorMeta("float32", (1 << 30,), ("raw", "zstd")), max_bytes=MiB)


def test_bool_payload_must_hold_only_zero_and_one():
    with pytest.raises(CodecError, match="codec stage 'raw': bool payload"):
        decode_tensor(b"\x00\x01\x02", TensorMeta("bool", (3,), ("raw",)), max_bytes=MiB)


def test_zstd_bomb_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 * MiB))  # ~8 KiB on the wire
    assert len(bomb) < 64 * 1024
    meta = TensorMeta("uint8", (1024,), ("raw", "zstd"))  # the table lies small, the frame is huge
    with pytest.raises(CodecError, match=r"codec stage 'zstd': frame declares 268435456 decompressed bytes > limit"):
        decode_tensor(bomb, meta, max_bytes=MiB)


def test_zstd_frame_without_declared_size_is_refused():
    obj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = obj.compress(bytes(4096)) + obj.flush()
    with pytest.raises(CodecError, match="codec stage 'zstd': frame does not declare"):
        decode_tensor(frame, TensorMeta("uint8", (4096,), ("raw", "zstd")), max_bytes=MiB)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_zstd_is_a_codec_error(damage):
    payload, meta = encode_tensor(torch.randn(1000), ("raw", "zstd"))
    bad = b"not zstd at all" if damage == "garbage" else payload[:-7]
    with pytest.raises(CodecError, match="codec stage 'zstd'"):
        decode_tensor(bad, meta, max_bytes=MiB)


def test_zstd_frame_lying_about_its_size_is_refused():
    payload, meta = encode_tensor(torch.arange(256, dtype=torch.uint8), ("raw", "zstd"))
    # The content size ends the frame header; for 256..65791 it is 2 bytes holding size - 256.
    end = zstandard.frame_header_size(payload)
    forged = payload[: end - 2] + (300 - 256).to_bytes(2, "little") + payload[end:]
    assert zstandard.get_frame_parameters(forged).content_size == 300
    with pytest.raises(CodecError, match="codec stage 'zstd'"):
        decode_tensor(forged, TensorMeta("uint8", (300,), meta.stages), max_bytes=MiB)


def test_stage_registry_is_open_for_new_stages():
    class Negate(codec.TensorStage):
        name = "test_negate"

        def encode(self, t):
            return -t

        def decode(self, t, target):
            return -t

    codec.register_stage(Negate)
    try:
        t = torch.randn(8)
        payload, meta = encode_tensor(t, ("test_negate", "raw", "zstd"))
        assert meta.stages == ("test_negate", "raw", "zstd")
        assert torch.equal(decode_tensor(payload, meta, max_bytes=MiB), t)
        assert torch.equal(decode_tensor(*encode_tensor(t, ("raw",)), max_bytes=MiB), t)
    finally:
        del codec.STAGES["test_negate"]


def test_every_pipeline_combination_of_byte_stages_round_trips():
    t = sample(torch.float32, (33,))
    for n in range(3):
        for combo in itertools.permutations(["shuffle", "zstd"], n):
            stages = ("raw", *combo)
            assert torch.equal(decode_tensor(*encode_tensor(t, stages), max_bytes=MiB), t), stages

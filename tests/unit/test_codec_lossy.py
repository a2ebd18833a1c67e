"""The lossy stages: round trips, error bounds measured against the maths, and decoders that refuse
payloads edited to lie. The lossless stages are covered by test_codec.py."""

import math
import struct

import pytest
import torch

from fsl_edge.codec import TensorMeta, decode_tensor, encode_tensor, make_stage
from fsl_edge.errors import CodecError

MiB = 1 << 20
HEADER = struct.Struct("<BBHI")  # the qblock wire header: bits, scale dtype code, block, outlier count
BF16_SLACK = 1 + 2 ** -6  # scales are rounded up to bf16: at most ~1.2 % above absmax / qmax

PIPELINES = [
    ("cast:to=bfloat16", "raw"),
    ("cast:to=float16", "raw", "shuffle", "zstd"),
    ("cast:to=float32", "raw"),
    ("randtopk:k=0.1", "raw"),
    ("randtopk:k=0.3,p=0.2", "raw", "zstd"),
    ("qblock:bits=8,block=64",),
    ("qblock:bits=4,block=32,outliers=2,sr=1", "zstd"),
    ("randtopk:k=0.1", "qblock:bits=8,block=64", "zstd"),
    ("cast:to=bfloat16", "qblock:bits=4,block=16", "shuffle", "zstd"),
    ("cast:to=float16", "randtopk:k=0.5,p=0.5", "qblock:bits=8,block=8,outliers=1,sr=1", "zstd"),
]
SHAPES = [(2, 5, 48), (100,), (4, 64), (3, 7), (0,), (3, 0), (1,), (), (1, 1, 1)]  # (B, T, C), 1-D, ...


def gaussian(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def roundtrip(t: torch.Tensor, stages) -> torch.Tensor:
    return decode_tensor(*encode_tensor(t, stages), max_bytes=MiB)


def half_step(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Per element: half the quantisation step of its block, computed by hand from the block's absmax."""
    qmax = 127 if bits == 8 else 7
    flat = x.double().reshape(-1)
    pad = (-flat.numel()) % block
    absmax = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block).abs().amax(1, keepdim=True)
    return (absmax / qmax / 2 * BF16_SLACK).expand(-1, block).reshape(-1)[: flat.numel()].reshape(x.shape)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stages", PIPELINES, ids="+".join)
def test_every_lossy_pipeline_keeps_dtype_and_shape(stages, shape, dtype):
    t = gaussian(shape, dtype=dtype)
    payload, meta = encode_tensor(t, stages)
    assert meta.dtype == str(dtype).removeprefix("torch.") and meta.shape == tuple(shape)
    out = decode_tensor(payload, meta, max_bytes=MiB)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.isfinite(out).all()
    if t.numel():
        # top-k keeps the largest element whatever k is; every quantiser here keeps it within a step
        i = t.float().abs().argmax()
        scale = max(t.float().abs().max().item(), out.float().abs().max().item())
        assert abs(out.reshape(-1)[i].float() - t.reshape(-1)[i].float()) <= 0.15 * scale


# --- qblock error bounds ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block, shape", [(64, (2, 16, 96)), (16, (1000,)), (8, (5, 3))], ids=str)
def test_qblock_rounding_error_is_at_most_half_a_step_of_its_block(bits, block, shape):
    t = gaussian(shape) * torch.logspace(-3, 3, shape[-1])  # blocks of very different scales
    out = roundtrip(t, (f"qblock:bits={bits},block={block}",))
    err = (out.double() - t.double()).abs()
    assert (err <= half_step(t, bits, block)).all()
    assert (err > 0).any()  # it is lossy: the bound is not met by sending everything exactly


def test_qblock_stochastic_rounding_error_is_below_one_step():
    t = gaussian((8, 256))
    out = roundtrip(t, ("qblock:bits=4,block=64,sr=1",))
    err = (out.double() - t.double()).abs()
    assert (err < 2 * half_step(t, 4, 64)).all()
    # half a step is not always met: the draw did round away from the nearest code somewhere
    assert (err > half_step(t, 4, 64)).any()


def pinned_blocks(value: float, n_blocks: int, block: int = 64) -> torch.Tensor:
    """Blocks whose absmax is 1 (so the step is fixed), all other elements `value`."""
    x = torch.full((n_blocks, block), value)
    x[:, 0] = 1.0
    return x


def test_qblock_stochastic_rounding_is_unbiased_within_a_tensor():
    value = 0.4 / 127  # 0.4 of a step: nearest rounding always gives code 0, a bias of 0.4 steps
    t = pinned_blocks(value, 500)
    step = 1 / 127
    nearest = roundtrip(t, ("qblock:bits=8,block=64",))[:, 1:]
    stochastic = roundtrip(t, ("qblock:bits=8,block=64,sr=1",))[:, 1:]
    assert abs(nearest.double().mean().item() - value) > 0.3 * step
    assert abs(stochastic.double().mean().item() - value) < 0.03 * step  # ~7 standard errors


def test_qblock_stochastic_rounding_is_unbiased_across_tensors():
    value, step = 0.4 / 127, 1 / 127
    base = pinned_blocks(value, 1)
    draws = []
    for i in range(200):
        t = base.clone()
        t[0, 1] += i * 1e-9  # a different tensor, hence a different draw; element 1 is left out below
        draws.append(roundtrip(t, ("qblock:bits=8,block=64,sr=1",))[0, 2:])
    draws = torch.stack(draws).double()  # (200, 62)
    assert abs(draws.mean().item() - value) < 0.03 * step
    # every element was rounded both ways over the draws: they really differ between tensors
    assert ((draws > value).any(0) & (draws < value).any(0)).all()


def test_qblock_same_tensor_same_bytes_even_with_stochastic_rounding():
    t = gaussian((4, 128))
    assert encode_tensor(t, ("qblock:bits=4,block=64,sr=1",)) == encode_tensor(t.clone(), ("qblock:bits=4,block=64,sr=1",))


def test_int4_error_is_about_127_over_7_times_int8_error():
    t = gaussian((4, 64, 256))
    rms = {bits: (roundtrip(t, (f"qblock:bits={bits},block=64",)) - t).pow(2).mean().sqrt().item() for bits in (4, 8)}
    assert 15 < rms[4] / rms[8] < 21  # 127 / 7 = 18.1: same scales, 18x coarser steps


def activations_with_outliers(n_outliers: int = 3) -> tuple[torch.Tensor, list[int]]:
    t = gaussian((2, 16, 64))  # (B, T, C)
    channels = [5, 17, 40][:n_outliers]
    t[..., channels] *= 100  # LLM activations: a few channels two orders of magnitude larger
    return t, channels


def test_outlier_channels_are_sent_at_fp16_and_spare_the_other_channels():
    t, channels = activations_with_outliers()
    rest = [c for c in range(64) if c not in channels]
    plain = roundtrip(t, ("qblock:bits=4,block=64",))
    kept = roundtrip(t, ("qblock:bits=4,block=64,outliers=3",))

    def rel(out):
        return ((out - t)[..., rest].norm() / t[..., rest].norm()).item()

    assert rel(plain) > 0.9  # without: the small channels round to zero next to the outliers
    assert rel(kept) < 0.15  # with: int4 on a Gaussian, ~0.1
    # the outlier channels: exactly fp16 rounding of the values (relative error <= 2**-11)
    assert torch.equal(kept[..., channels], t[..., channels].half().float())
    assert ((kept - t)[..., channels].abs() <= t[..., channels].abs() * 2 ** -11).all()
    # the other channels: half a step of blocks whose absmax no longer includes the outliers
    zeroed = t.clone()
    zeroed[..., channels] = 0
    assert ((kept - t).abs()[..., rest] <= half_step(zeroed, 4, 64)[..., rest]).all()


def test_more_outliers_than_channels_sends_every_channel_at_fp16():
    t = gaussian((3, 8))
    payload, _ = encode_tensor(t, ("qblock:bits=8,block=8,outliers=100",))
    assert HEADER.unpack_from(payload)[3] == 8
    assert torch.equal(roundtrip(t, ("qblock:bits=8,block=8,outliers=100",)), t.half().float())


def test_outlier_channel_beyond_fp16_range_round_trips_or_is_refused_when_encoding():
    t = torch.ones(4, 16)
    t[:, 3] = 1e5  # finite fp32 activation; the plain qblock path carries it fine (bf16 scales)
    stages = ("qblock:bits=8,block=8,outliers=1",)
    try:
        payload, meta = encode_tensor(t, stages)
    except CodecError as e:  # an acceptable fix: say so when encoding
        assert "qblock" in str(e)
        return
    out = decode_tensor(payload, meta, max_bytes=MiB)
    assert torch.allclose(out, t, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_values_near_the_dtype_max_decode_finite(dtype, bits):
    t = torch.tensor([torch.finfo(dtype).max, 1.0] * 8, dtype=dtype)
    out = roundtrip(t, (f"qblock:bits={bits},block=16",))
    assert torch.isfinite(out).all()


# --- cast -------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["bfloat16", "float16"])
def test_cast_error_is_within_half_an_epsilon(to):
    t = gaussian((4, 32, 64)) * 10
    out = roundtrip(t, (f"cast:to={to}", "raw"))
    eps = torch.finfo(getattr(torch, to)).eps
    assert out.dtype == torch.float32
    assert ((out - t).abs() <= t.abs() * eps / 2).all()
    assert torch.equal(out, t.to(getattr(torch, to)).float())
    assert not torch.equal(out, t)


def test_cast_up_and_back_is_exact():
    t = gaussian((3, 9), dtype=torch.bfloat16)
    assert torch.equal(roundtrip(t, ("cast:to=float32", "raw", "shuffle", "zstd")), t)


def test_cast_refuses_non_float_tensors():
    with pytest.raises(CodecError, match="codec stage 'cast': casts floating-point tensors only"):
        encode_tensor(torch.arange(4), ("cast:to=bfloat16", "raw"))
    with pytest.raises(CodecError, match="codec stage 'cast'"):  # a receiver told an int64 was cast
        decode_tensor(bytes(8), TensorMeta("int64", (4,), ("cast:to=bfloat16", "raw")), max_bytes=MiB)
    with pytest.raises(CodecError, match="codec stage 'cast': bad parameters"):
        make_stage("cast:to=int8")


# --- randtopk ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.001, 0.1, 0.37, 1.0])
def test_randtopk_keeps_exactly_the_largest_unchanged(k):
    t = gaussian((7, 143))  # 1001 elements: k * n is not a whole number
    out = roundtrip(t, (f"randtopk:k={k}", "raw"))
    keep = math.ceil(k * t.numel())
    nonzero = out != 0
    assert nonzero.sum().item() == keep
    assert torch.equal(out[nonzero], t[nonzero])  # values unchanged
    dropped = torch.cat([t[~nonzero].abs(), torch.zeros(1)])
    assert t[nonzero].abs().min() >= dropped.max()  # and they are the largest


def test_randtopk_random_part_is_unbiased_over_inputs():
    p = 0.25
    base = gaussian((1000,)).abs() + 0.1  # all positive: the sum to estimate is large
    top = base.topk(100).indices
    rest = torch.ones(1000, dtype=torch.bool)
    rest[top] = False
    estimates = []
    nudged = rest.nonzero()[0]  # nudging one small element keeps the top set: another input, another draw
    for i in range(200):
        t = base.clone()
        t[nudged] += i * 1e-6
        out = roundtrip(t, (f"randtopk:k=0.1,p={p}", "raw"))
        assert torch.equal(out[top], t[top])
        estimates.append((out[rest].sum() - t[rest].sum()).item())
    true_rest = base[rest].sum().item()
    mean_error = sum(estimates) / len(estimates)
    # one estimate's spread is ~35; the mean of 200 ~2.5. Without the 1/p scaling it would be -0.75 * ~550.
    assert abs(mean_error) < 0.03 * true_rest
    assert max(map(abs, estimates)) > 0.03 * true_rest  # the single estimates really are random


def test_randtopk_is_deterministic_per_input_and_differs_between_inputs():
    t = gaussian((50, 40))
    stages = ("randtopk:k=0.05,p=0.3", "raw")
    assert encode_tensor(t, stages) == encode_tensor(t.clone(), stages)
    other = t.clone()
    other[0, 0] += 1e-3
    picked = roundtrip(t, stages) != 0
    picked_other = roundtrip(other, stages) != 0
    assert not torch.equal(picked, picked_other)
    assert 0.3 < picked.float().mean().item() < 0.4  # 5 % top + 30 % of the other 95 %


@pytest.mark.parametrize("spec", ["randtopk:k=0", "randtopk:k=1.5", "randtopk:k=-0.1", "randtopk:p=-0.1",
                                  "randtopk:p=1.5", "randtopk:k=some"])
def test_randtopk_parameters_out_of_range_are_refused(spec):
    with pytest.raises(CodecError, match="codec stage 'randtopk': bad parameters"):
        make_stage(spec)


def test_randtopk_refuses_non_float_tensors():
    with pytest.raises(CodecError, match="codec stage 'randtopk'"):
        encode_tensor(torch.arange(10), ("randtopk:k=0.5", "raw"))


@pytest.mark.parametrize("spec", ["qblock:bits=3", "qblock:bits=16", "qblock:block=7", "qblock:block=9",
                                  "qblock:block=65536", "qblock:block=8.0", "qblock:outliers=-1"])
def test_qblock_parameters_out_of_range_are_refused(spec):
    with pytest.raises(CodecError, match="codec stage 'qblock': bad parameters"):
        make_stage(spec)


# --- composition and ratios -------------------------------------------------------------------


def test_topk_then_int8_then_zstd_keeps_the_top_within_a_step_and_zeros_the_rest():
    t = gaussian((4, 32, 64))
    out = roundtrip(t, ("randtopk:k=0.1", "qblock:bits=8,block=64", "zstd"))
    top = torch.zeros(t.numel(), dtype=torch.bool)
    top[t.reshape(-1).abs().topk(math.ceil(0.1 * t.numel())).indices] = True
    top = top.reshape(t.shape)
    assert (out[~top] == 0).all()
    sparse = torch.where(top, t, torch.zeros(()))
    assert ((out - sparse).abs() <= half_step(sparse, 8, 64)).all()


def test_cast_then_shuffled_zstd_is_the_cast_exactly():
    t = gaussian((4, 32, 64))
    assert torch.equal(roundtrip(t, ("cast:to=bfloat16", "raw", "shuffle", "zstd")), t.bfloat16().float())


@pytest.mark.parametrize("stages, low, high", [
    (("qblock:bits=8,block=64",), 3.5, 4.0),  # 4 bytes -> 1 + 2/64
    (("qblock:bits=8,block=64", "zstd"), 3.5, 4.6),
    (("qblock:bits=4,block=64", "zstd"), 6, 10),
    (("qblock:bits=4,block=64,outliers=8", "zstd"), 6, 10),
    (("cast:to=bfloat16", "raw", "shuffle", "zstd"), 2, 3.2),
    (("randtopk:k=0.1", "qblock:bits=8,block=64", "zstd"), 10, 40),
], ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v))
def test_ratios_against_raw_fp32_on_gaussian_activations(stages, low, high):
    t = gaussian((4, 64, 256))  # (B, T, C)
    ratio = t.numel() * 4 / len(encode_tensor(t, stages)[0])
    assert low < ratio < high


# --- malformed qblock payloads ----------------------------------------------------------------

SPEC = "qblock:bits=8,block=16,outliers=2"
SHAPE = (4, 16)  # 4 rows, 16 channels, 4 blocks


def encoded(spec: str = SPEC, shape=SHAPE) -> tuple[bytearray, TensorMeta, dict[str, slice]]:
    """A real payload, its meta and where each section of it lies."""
    t = gaussian(shape)
    t[:, 2] *= 50
    payload, meta = encode_tensor(t, (spec,))
    bits, _, block, n_out = HEADER.unpack_from(payload)
    n_rows, numel = math.prod(shape[:-1]), math.prod(shape)
    n_blocks = -(-numel // block)
    sizes = {"ids": 4 * n_out, "kept": 2 * n_out * n_rows, "scales": 2 * n_blocks,
             "codes": n_blocks * block * bits // 8}
    at, spans = HEADER.size, {}
    for name, size in sizes.items():
        spans[name] = slice(at, at + size)
        at += size
    assert at == len(payload)
    return bytearray(payload), meta, spans


def refused(payload, meta, match, max_bytes=MiB):
    with pytest.raises(CodecError, match=r"codec stage 'qblock': " + match):
        decode_tensor(bytes(payload), meta, max_bytes=max_bytes)


def test_the_payload_layout_is_what_the_docstring_says():
    payload, meta, spans = encoded()
    assert HEADER.unpack_from(payload) == (8, 0, 16, 2)
    ids = torch.frombuffer(payload[spans["ids"]], dtype=torch.int32)
    assert 2 in ids.tolist()  # the channel made 50x larger is an outlier
    assert decode_tensor(bytes(payload), meta, max_bytes=MiB).shape == SHAPE


@pytest.mark.parametrize("keep", [0, 5, HEADER.size, HEADER.size + 3, -1])
def test_truncated_payload_is_refused(keep):
    payload, meta, _ = encoded()
    refused(payload[:keep], meta, "payload")


def test_trailing_byte_is_refused():
    payload, meta, _ = encoded()
    refused(payload + b"\0", meta, "payload has")


@pytest.mark.parametrize("bits, block", [(4, 16), (8, 32), (8, 0)])
def test_header_disagreeing_with_the_spec_is_refused(bits, block):
    payload, meta, _ = encoded()
    HEADER.pack_into(payload, 0, bits, 0, block, 2)
    refused(payload, meta, f"payload says bits={bits}, block={block}; the spec says bits=8, block=16")


@pytest.mark.parametrize("n_out", [17, 2 ** 32 - 1])
def test_more_outliers_than_channels_is_refused(n_out):
    payload, meta, _ = encoded()
    HEADER.pack_into(payload, 0, 8, 0, 16, n_out)
    refused(payload, meta, f"{n_out} outlier channels in a tensor of 16 channels")


def test_outliers_in_an_empty_tensor_are_refused():
    payload, meta, _ = encoded(shape=(0, 16))
    HEADER.pack_into(payload, 0, 8, 0, 16, 1)
    refused(payload + bytes(4), meta, "1 outlier channels")


@pytest.mark.parametrize("ids", [(3, 3), (0, 16), (-1, 4), (2, 2 ** 31 - 1)])
def test_duplicate_or_out_of_range_outlier_ids_are_refused(ids):
    payload, meta, spans = encoded()
    payload[spans["ids"]] = struct.pack("<2i", *ids)
    refused(payload, meta, r"outlier channel ids must be distinct and in \[0, 16\)")


@pytest.mark.parametrize("bits16", [0x7F80, 0xFF80, 0x7FC0], ids=["inf", "-inf", "nan"])
def test_non_finite_scale_is_refused(bits16):
    payload, meta, spans = encoded()
    at = spans["scales"].start + 2  # the second block's scale
    payload[at:at + 2] = struct.pack("<H", bits16)
    refused(payload, meta, "non-finite scale or outlier value")


def test_non_finite_outlier_value_is_refused():
    payload, meta, spans = encoded()
    payload[spans["kept"].start:spans["kept"].start + 2] = struct.pack("<H", 0x7C00)  # fp16 inf
    refused(payload, meta, "non-finite scale or outlier value")


@pytest.mark.parametrize("byte", [0x00, 0x80, 0x08], ids=["both-nibbles", "low-nibble", "high-nibble"])
def test_int4_code_minus_8_is_refused(byte):
    # codes travel as code + 8: a nibble of 0 is -8, outside the symmetric [-7, 7]
    payload, meta, spans = encoded("qblock:bits=4,block=16")
    payload[spans["codes"].start + 5] = byte
    refused(payload, meta, r"a code is outside \[-7, 7\]")


def test_int8_code_minus_128_is_refused():
    payload, meta, spans = encoded()
    payload[spans["codes"].stop - 1] = 0x80
    refused(payload, meta, r"a code is outside \[-127, 127\]")


def test_non_float_layout_is_refused():
    payload, meta, _ = encoded()
    refused(payload, TensorMeta("int32", meta.shape, meta.stages), "decodes to floating-point tensors only")


def test_declared_shape_over_the_limit_is_refused_by_qblock():
    # fp16 passes the generic check (2 bytes an element) but qblock decodes through fp32 (4 bytes)
    payload, _, _ = encoded(shape=(64, 16))
    meta = TensorMeta("float16", (64, 16), (SPEC,))
    refused(payload, meta, "1024 elements exceed the limit of 3000 bytes", max_bytes=3000)


def test_size_checks_come_before_any_allocation():
    # A tiny payload declaring 2**31 elements, under a limit that admits them: the length check
    # must refuse it before buffers for 2**31 codes exist (8 GiB as fp32). The codes are also
    # invalid, so a decoder that looked at them first would name the wrong problem.
    payload, _, spans = encoded()
    payload[spans["codes"].start] = 0x80
    meta = TensorMeta("float16", (1 << 27, 16), (SPEC,))
    refused(payload, meta, r"payload has \d+ bytes", max_bytes=1 << 34)
    refused(payload, meta, r"2147483648 elements exceed the limit", max_bytes=1 << 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_qblock_refuses_non_finite_input_when_encoding(bad):
    # refused by the sender, naming the stage, rather than sent and refused by the receiver
    t = torch.ones(4, 16)
    t[1, 2] = bad
    with pytest.raises(CodecError, match="codec stage 'qblock': cannot quantise non-finite"):
        encode_tensor(t, ("qblock:bits=8,block=16",))


def test_a_cast_to_half_precision_saturates_instead_of_overflowing():
    t = torch.tensor([1e6, -1e6, 1.0])
    data, meta = encode_tensor(t, ("cast:to=float16", "raw"))
    out = decode_tensor(data, meta, 1 << 20)
    assert torch.isfinite(out).all() and out[0] == 65504 and out[1] == -65504 and out[2] == 1

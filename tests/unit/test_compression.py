"""Presets, settings, step messages through their codecs, and the adapter deltas' error feedback."""

import dataclasses
import itertools

import pydantic
import pytest
import torch

from fsl_edge.codec import build_pipeline, encode_tensor
from fsl_edge.compression import (
    LOSSLESS,
    PRESETS,
    Downlink,
    Pipelines,
    StepCodec,
    Uplink,
    aggregate,
    apply,
    is_lossless,
    payload_bytes,
    roundtrip,
)
from fsl_edge.config import CompressionSettings, Preset
from fsl_edge.messages import ActivationDown, ActivationUp, GradientUp

LOSSY_UPLOAD = ("randtopk:k=0.1", "qblock:bits=8,block=64", "zstd")
FIELDS = [f.name for f in dataclasses.fields(Pipelines)]


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q.lora_A": torch.randn((8, 64), generator=g) * scale,
            "q.lora_B": torch.randn((64, 8), generator=g) * scale,
            "v.lora_B": torch.randn((32, 8), generator=g) * scale}


# --- Uplink: error feedback -------------------------------------------------------------------


def test_uplink_error_feedback_loses_nothing_only_delays_it():
    up = Uplink(LOSSY_UPLOAD)
    base = random_state(0)
    true_sum = {k: torch.zeros_like(v) for k, v in base.items()}
    sent_sum = {k: torch.zeros_like(v) for k, v in base.items()}
    for r in range(1, 6):
        local = apply(base, random_state(r, scale=0.01))
        _, decoded = up.delta(local, base)
        for k in base:
            true_sum[k] += local[k] - base[k]
            sent_sum[k] += decoded[k]
            assert (decoded[k] != 0).float().mean() <= 0.11  # top-10 %: most of it was left out ...
        base = apply(base, decoded)  # the next round starts from what the coordinator got
    for k in base:
        assert torch.allclose(sent_sum[k] + up.residual[k], true_sum[k], atol=1e-5)  # ... and kept
        assert up.residual[k].abs().max() > 1e-3


def test_uplink_sends_the_residual_with_the_next_delta():
    up = Uplink(LOSSY_UPLOAD)
    base = random_state(0)
    up.delta(apply(base, random_state(1, 0.01)), base)
    residual = {k: v.clone() for k, v in up.residual.items()}
    local = apply(base, random_state(2, 0.01))
    send, decoded = up.delta(local, base)
    for k in base:
        assert torch.allclose(send[k], local[k] - base[k] + residual[k])
        assert torch.equal(decoded[k], roundtrip(send[k], LOSSY_UPLOAD)[0])


@pytest.mark.parametrize("stages", [LOSSLESS, ("raw",)], ids="+".join)
def test_uplink_lossless_leaves_no_residual(stages):
    up = Uplink(stages)
    base = random_state(0)
    for r in range(1, 4):
        local = apply(base, random_state(r, scale=0.01))
        _, decoded = up.delta(local, base)
        for k in base:
            assert torch.equal(decoded[k], local[k] - base[k])
            assert torch.equal(up.residual[k], torch.zeros_like(base[k]))
        base = local


def test_uplink_handles_a_tensor_smaller_than_a_block():
    up = Uplink(PRESETS["balanced"].upload)  # randtopk, qblock block=64, zstd
    bias = {"bias": torch.randn(4)}
    _, decoded = up.delta(bias, {"bias": torch.zeros(4)})
    assert torch.allclose(decoded["bias"] + up.residual["bias"], bias["bias"])


# --- Downlink ---------------------------------------------------------------------------------


def test_downlink_first_round_is_sent_in_full():
    down = Downlink(PRESETS["balanced"].download)
    target = random_state(0)
    assert down.advance(target) is None and down.version == 1
    assert all(torch.equal(down.shared[k], target[k]) for k in target)
    target["q.lora_A"] += 1  # the agents' copy is not an alias of the coordinator's adapter
    assert not torch.equal(down.shared["q.lora_A"], target["q.lora_A"])


def test_downlink_shared_trails_the_target_by_exactly_the_residual():
    stages = PRESETS["balanced"].download
    down = Downlink(stages)
    down.advance(random_state(0))
    target = random_state(1)
    gaps = []
    for version in range(2, 8):
        before = {k: v.clone() for k, v in down.shared.items()}
        delta = down.advance(target)
        assert down.version == version
        for k in target:
            assert torch.allclose(delta[k], target[k] - before[k])  # the delta carries the last residual
            # shared moved by what the agents decode; what remains is what the delta left out
            decoded = roundtrip(delta[k], stages)[0]
            assert torch.allclose(down.shared[k], before[k] + decoded, atol=0)
            assert torch.allclose(target[k] - down.shared[k], delta[k] - decoded, atol=1e-6)
        gaps.append(sum((target[k] - down.shared[k]).norm().item() for k in target))
    assert all(b < a for a, b in itertools.pairwise(gaps))  # shared approaches the target ...
    assert 0 < gaps[-1] < 0.3 * gaps[0]  # ... without reaching it in one lossy step


@pytest.mark.parametrize("stages", [LOSSLESS, ("raw",)], ids="+".join)
def test_downlink_lossless_sends_the_adapter_exactly_every_time(stages):
    down = Downlink(stages)
    for r in range(3):
        target = random_state(r)
        assert down.advance(target) is None
        assert all(torch.equal(down.shared[k], target[k]) for k in target)


# --- StepCodec --------------------------------------------------------------------------------


def activation_up(labels: bool = False) -> ActivationUp:
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 8, 64
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, 5:] = 0  # right padding
    return ActivationUp(hidden=torch.randn((B, T, C), generator=g) * 3,
                        attention_mask=mask,
                        position_ids=torch.arange(T).expand(B, T).clone() + 10_000,  # > any int8/fp16 code
                        labels=torch.randint(0, 50_000, (B, T), generator=g) if labels else None)


# the largest error of the hidden state, as a fraction of its absmax: int4 rounding is half of 1/7
TOLERANCE = {"none": 0.0, "lossless": 0.0, "balanced": 0.5 / 7 * 1.02, "aggressive": 0.5 / 7 * 1.02}


@pytest.mark.parametrize("labels", [False, True], ids=["u-shape", "vanilla"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_step_codec_keeps_masks_exact_and_hidden_within_tolerance(preset, labels):
    codec = StepCodec(PRESETS[preset])
    message = activation_up(labels)
    out, sent = codec.through(message)
    assert type(out) is ActivationUp
    for name in ("attention_mask", "position_ids") + (("labels",) if labels else ()):
        assert getattr(out, name).dtype == torch.int64
        assert torch.equal(getattr(out, name), getattr(message, name))
    assert out.labels is None or labels
    h = message.hidden
    assert out.hidden.dtype == h.dtype and out.hidden.shape == h.shape
    assert (out.hidden - h).abs().max() <= TOLERANCE[preset] * h.abs().max()
    if TOLERANCE[preset]:
        assert not torch.equal(out.hidden, h)
    expected = sum(len(encode_tensor(t, codec.stages(message.kind, t))[0]) for t in message.tensors().values())
    assert sent == expected


def test_step_codec_picks_the_pipeline_of_each_kind():
    pipes = PRESETS["aggressive"]
    codec = StepCodec(pipes)
    hidden, mask = torch.randn(2, 8, 64), torch.ones(2, 8, dtype=torch.int64)
    assert codec.stages("activation_up", hidden) == pipes.activations
    assert codec.stages("activation_down", hidden) == pipes.activations
    assert codec.stages("gradient_up", hidden) == pipes.gradients
    assert codec.stages("gradient_down", hidden) == pipes.gradients
    assert codec.stages("activation_up", mask) == pipes.integers
    # aggressive sparsifies gradients (top-25 %) but not activations
    grad, _ = codec.through(GradientUp(grad=hidden))
    assert 0.2 < (grad.grad != 0).float().mean() < 0.3
    down, _ = codec.through(ActivationDown(hidden=hidden))
    assert (down.hidden != 0).float().mean() > 0.8


# --- presets and settings ---------------------------------------------------------------------


@pytest.mark.parametrize("preset, lossless", [("none", True), ("lossless", True), ("balanced", False),
                                              ("aggressive", False)])
def test_presets_lossless_or_not(preset, lossless):
    pipes = PRESETS[preset]
    steps = [getattr(pipes, f) for f in ("activations", "gradients", "upload", "download")]
    assert all(map(is_lossless, steps)) is lossless
    if not lossless:
        assert not any(map(is_lossless, steps))
    assert is_lossless(pipes.integers) and is_lossless(pipes.full_download)  # these are exact in every preset


def test_is_lossless_judges_every_stage():
    assert is_lossless(("raw", "shuffle", "zstd:level=9"))
    assert not is_lossless(("cast:to=bfloat16", "raw"))
    assert not is_lossless(("randtopk:k=0.5", "raw"))
    assert not is_lossless(("qblock:bits=8,block=64", "zstd"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_pipeline_builds_and_round_trips(preset):
    pipes = PRESETS[preset]
    t = torch.randn(4, 16, 64)
    for field in FIELDS + ["full_download"]:
        stages = getattr(pipes, field)
        build_pipeline(list(stages))
        sample = torch.arange(12).reshape(3, 4) if field == "integers" else t
        out, n = roundtrip(sample, stages)
        assert out.dtype == sample.dtype and out.shape == sample.shape and n > 0
    assert pipes.full_download == (pipes.download if is_lossless(pipes.download) else LOSSLESS)


def test_unknown_preset_is_refused_with_the_known_ones():
    with pytest.raises(pydantic.ValidationError, match=r"preset\s[\s\S]*none.*lossless.*balanced.*aggressive"):
        CompressionSettings(preset="nope")


def test_every_preset_name_has_pipelines():
    assert {p.value for p in Preset} == set(PRESETS)
    for name in PRESETS:
        assert CompressionSettings(preset=name).pipelines() == PRESETS[name]


@pytest.mark.parametrize("field, pipeline, problem", [
    ("activations", ["qblock:bits=3"], r"activations: codec stage 'qblock': bad parameters.*bits must be 4 or 8"),
    ("gradients", ["zstd"], "gradients: codec: pipeline .* exactly one serialiser"),
    ("upload", ["randtopk:k=2", "raw"], "upload: codec stage 'randtopk': bad parameters"),
    ("download", ["raw", "lz4"], "download: codec: unknown stage 'lz4'"),
])
def test_bad_pipeline_override_is_refused_when_loading(field, pipeline, problem):
    with pytest.raises(pydantic.ValidationError, match=problem):
        CompressionSettings(**{field: pipeline})


def test_settings_default_to_the_lossless_preset():
    assert CompressionSettings().pipelines() == PRESETS["lossless"]


@pytest.mark.parametrize("field", ["activations", "gradients", "upload", "download"])
def test_an_override_replaces_only_its_own_field(field):
    override = ("qblock:bits=8,block=32", "shuffle", "zstd")
    pipes = CompressionSettings(preset="balanced", **{field: list(override)}).pipelines()
    assert getattr(pipes, field) == override
    for other in FIELDS:
        if other != field:
            assert getattr(pipes, other) == getattr(PRESETS["balanced"], other)


# --- byte accounting and the aggregation helpers ----------------------------------------------


def test_payload_bytes_of_a_state_dict():
    state = {"w": torch.randn(8, 16), "b": torch.randn(16).bfloat16(), "n": torch.arange(3)}
    assert payload_bytes(state, ("raw",)) == 8 * 16 * 4 + 16 * 2 + 3 * 8
    stages = PRESETS["lossless"].upload
    assert payload_bytes(state, stages) == sum(len(encode_tensor(t, stages)[0]) for t in state.values())
    assert payload_bytes({}, stages) == 0


def test_apply_and_aggregate_against_hand_computed_values():
    g = {"a": torch.tensor([1.0, 2.0])}
    deltas = [{"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([0.0, 4.0])}]

    def average(states, weights):
        return {k: sum(w * s[k] for s, w in zip(states, weights)) / sum(weights) for k in states[0]}

    def step(old, new, lr):
        return {k: old[k] + lr * (new[k] - old[k]) for k in old}

    assert torch.equal(apply(g, deltas[0])["a"], torch.tensor([2.0, 2.0]))
    # mean delta with weights 3:1 = [0.75, 1.0]; half a step from [1, 2] -> [1.375, 2.5]
    new = aggregate(g, deltas, [3.0, 1.0], average, step, lr=0.5)
    assert torch.equal(new["a"], torch.tensor([1.375, 2.5]))

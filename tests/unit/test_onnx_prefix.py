"""The frozen prefix run by ONNX Runtime equals the torch reference (split.embed + run_blocks, one
unpadded sample), on tiny random-init models with LoRA attached and non-zero; bad files are refused.

Tolerance: both backends compute in fp32; ONNX Runtime fuses ops and sums in other orders, which
moves results by a few ulp per op (measured ~1e-7 on outputs of scale ~0.2). We allow
1e-4 x max|reference|: three orders of magnitude of headroom, yet a wrong mask, position or a
missing LoRA delta moves the output by more than 1e-2 x scale (`test_lora_changes_the_prefix`
proves the LoRA part). Each export takes seconds (torch.export), so two cases covering both
families and both cuts run by default and the rest are marked slow.
"""

import sys

import pytest
import torch

from fsl_edge.config import LoraSettings
from fsl_edge.errors import ConfigError, ModelError, SplitError
from fsl_edge.lora import adapter_state, attach, load_adapter_state
from fsl_edge.onnx_prefix import (OrtPrefix, TorchPrefix, _PrefixGraph, export_prefix,
                                  prefix_fingerprint)
from fsl_edge.split import discover, embed, positions, run_blocks
from fsl_edge.tiny import tiny_model

LENGTHS = (1, 5, 37)
RTOL_SCALE = 1e-4
slow = pytest.mark.slow
CASES = [("llama", 2), ("gpt2", 1),
         pytest.param(("llama", 1), marks=slow), pytest.param(("gpt2", 2), marks=slow),
         pytest.param(("mistral", 2), marks=slow)]  # mistral: a sliding window shorter than T


def lora_model(family: str) -> torch.nn.Module:
    """A peft-wrapped tiny model, LoRA on blocks 0-2 with random B (peft starts B at zero)."""
    model = attach(tiny_model(family), [0, 1, 2], LoraSettings(rank=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    load_adapter_state(model, {k: torch.randn(v.shape, generator=g) * 0.1
                               for k, v in adapter_state(model).items()})
    return model.train()  # the prefix must switch dropout off itself and leave this alone


def reference(model, f: int, ids: torch.Tensor) -> torch.Tensor:
    """The brief's reference: embed + blocks [0, f) on one unpadded sample, in eval mode."""
    parts = discover(model)
    T = ids.numel()
    mask = torch.ones(1, T, dtype=torch.long)
    pos = positions(mask)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = embed(parts, ids.view(1, T), pos)  # (1, T, C)
            return run_blocks(parts, h, 0, f, mask, pos)  # (1, T, C)
    finally:
        model.train(was_training)


def sample(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(seed))


def assert_close(mine: torch.Tensor, ref: torch.Tensor, rtol_scale: float = RTOL_SCALE) -> float:
    assert mine.shape == ref.shape and mine.dtype == torch.float32
    diff = (mine - ref).abs().max().item()
    assert diff <= rtol_scale * ref.abs().max().item(), diff
    return diff


_exports: dict[tuple[str, int], tuple] = {}


@pytest.fixture
def exported(request, tmp_path_factory):
    """(model, f, path) for a case, exported once per test session over an older file.

    Llama files carry the default fingerprint (prefix_fingerprint), the others a caller's own."""
    family, f = request.param
    if (family, f) not in _exports:
        model = lora_model(family)
        path = tmp_path_factory.mktemp("onnx") / "prefix.onnx"
        path.write_bytes(b"an older file")
        given = None if family == "llama" else f"given:{family}:{f}"
        assert export_prefix(discover(model), f, path, fingerprint=given) == path
        assert model.training and all(m.training for m in model.modules())
        _exports[family, f] = (model, f, path)
    return _exports[family, f]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("f", [1, 2])
def test_export_wrapper_computes_the_reference(family, f):
    model = lora_model(family).eval()
    graph = _PrefixGraph(discover(model), f)
    for T in LENGTHS:
        ids = sample(T)
        with torch.no_grad():
            # the same torch ops but for the mask: bit-equal on CPU here; 1e-6 leaves room for
            # SDPA picking another kernel for an explicit mask than for is_causal elsewhere
            assert_close(graph(ids.view(1, T)), reference(model, f, ids), rtol_scale=1e-6)


@pytest.mark.parametrize("exported", CASES, indirect=True)
def test_ort_matches_torch(exported):
    model, f, path = exported
    ort_prefix = OrtPrefix(path, threads=1)
    torch_prefix = TorchPrefix(model, f)
    assert ort_prefix.f == f and ort_prefix.hidden_size == 32
    for T in LENGTHS:
        ids = sample(T, seed=T)
        ref = reference(model, f, ids)
        assert_close(torch_prefix(ids), ref)
        assert_close(ort_prefix(ids), ref)
        assert_close(ort_prefix(ids.view(1, T).to(torch.int32)), ref)  # (1, T), other int dtype
    assert model.training  # TorchPrefix switched dropout off only while it ran


@pytest.mark.parametrize("exported", [("llama", 2)], indirect=True)
def test_lora_changes_the_prefix(exported):
    model, f, path = exported
    ids = sample(37)
    with model.disable_adapter():
        without = TorchPrefix(model, f)(ids)
    ref = reference(model, f, ids)
    assert (ref - without).abs().max() > 100 * RTOL_SCALE * ref.abs().max()
    assert_close(OrtPrefix(path)(ids), ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
@pytest.mark.parametrize("exported", [("llama", 2)], indirect=True)
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_provider_is_reported(exported, device):
    assert OrtPrefix(exported[2], device).provider == "CPUExecutionProvider"


@pytest.mark.parametrize("exported", [("llama", 2)], indirect=True)
def test_fingerprint_and_shape_are_checked(exported):
    model, f, path = exported
    ok = OrtPrefix(path, expect_f=f, expect_hidden=32,
                   expect_fingerprint=prefix_fingerprint(model, f))
    assert ok.fingerprint == prefix_fingerprint(discover(model), f)
    for wrong in ({"expect_fingerprint": "sha256:other"}, {"expect_f": f + 1},
                  {"expect_hidden": 64}):
        with pytest.raises(ModelError, match="exported with"):
            OrtPrefix(path, **wrong)


def test_fingerprint_follows_the_weights():
    model = lora_model("llama")
    before = prefix_fingerprint(model, 2)
    assert prefix_fingerprint(model, 2) == before != prefix_fingerprint(model, 1)
    state = adapter_state(model)
    key = next(k for k in state if ".layers.1." in k and "lora_B" in k)
    state[key] = state[key] + 1e-3
    load_adapter_state(model, state)
    assert prefix_fingerprint(model, 2) != before
    assert prefix_fingerprint(model, 1) == prefix_fingerprint(model, 1)


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(ModelError, match="no exported prefix"):
        OrtPrefix(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OrtPrefix(corrupt)


def test_other_onnx_models_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, tmp_path / "other.onnx")
    with pytest.raises(ModelError, match="not a prefix exported"):
        OrtPrefix(tmp_path / "other.onnx")


@pytest.mark.parametrize("exported", [("gpt2", 1)], indirect=True)
def test_bad_inputs_are_refused(exported):
    model, f, path = exported
    for prefix in (OrtPrefix(path), TorchPrefix(model, f)):
        for ids in (torch.zeros(2, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                    torch.zeros(4), torch.zeros(129, dtype=torch.long)):  # GPT-2 has 128 positions
            with pytest.raises(ConfigError):
                prefix(ids)
    with pytest.raises(ConfigError, match="device"):
        OrtPrefix(path, "tpu")


def test_export_refuses_a_prefix_longer_than_the_model(tmp_path):
    with pytest.raises(SplitError):
        export_prefix(tiny_model("llama"), 7, tmp_path / "p.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exported", [("gpt2", 1)], indirect=True)
def test_export_replaced_the_file_and_left_no_temporaries(exported):
    path = exported[2]
    assert [p.name for p in path.parent.iterdir()] == ["prefix.onnx"]  # weights embedded
    assert OrtPrefix(path, expect_fingerprint="given:gpt2:1").f == 1


def test_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ConfigError, match="pip install onnxruntime-gpu"):
        OrtPrefix(tmp_path / "p.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("exported", [("llama", 2)], indirect=True)
def test_cuda_provider_matches_torch(exported):
    model, f, path = exported
    prefix = OrtPrefix(path, "cuda")
    assert prefix.provider == "CUDAExecutionProvider"
    ids = sample(37)
    assert_close(prefix(ids), reference(model, f, ids))

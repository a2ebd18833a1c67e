"""The CUDA path: a split step on the GPU equals the same step on the CPU, and QLoRA loads.

CI has no GPU: these skip there; a machine with one runs them (`pytest -m gpu`)."""

import copy

import pytest
import torch

from fsl_edge.config import LoraSettings, SplitSettings
from fsl_edge.lora import adapter_state, load_adapter_state
from fsl_edge.step import ServerPart, SitePart, split_step
from fsl_edge.tiny import tiny_model

from .test_split_parity import make_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_split_step_on_gpu_matches_cpu():
    base = tiny_model("llama")
    cut = SplitSettings().cut(6)
    lora = LoraSettings(rank=4)
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        site = SitePart(copy.deepcopy(base).to(device), cut, lora, 1e-2)
        server = ServerPart(copy.deepcopy(base).to(device), cut, lora, 1e-2)
        if results:  # same starting adapters on both devices
            load_adapter_state(site.model, results["cpu"][1])
            load_adapter_state(server.model, results["cpu"][2])
        start = (adapter_state(site.model), adapter_state(server.model))
        losses = [split_step(site, server, make_batch(seed=s)).loss for s in range(3)]
        results[device] = (losses, *start) if device == "cpu" else (losses,)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-3)


def test_qlora_loads_a_pulled_model_in_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from fsl_edge.models import ModelSettings, load, pull

    settings = ModelSettings(models_dir=tmp_path)
    pull("smollm2", settings=settings)
    loaded = load("smollm2", settings=settings, device="cuda", quantize="4bit")
    assert getattr(loaded.model, "is_loaded_in_4bit", False)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_cached_frozen_prefix_on_gpu_matches_cpu(tmp_path, backend):
    from fsl_edge.config import PrefixSettings
    from fsl_edge.data import BatchStream, Sample, tokenize
    from fsl_edge.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    examples = tokenize([Sample("", "note " + "x" * i) for i in range(8)], tok, max_len=32)
    batch = next(BatchStream(examples, 4, seed=0, pad_id=tok.pad_token_id))
    cut = SplitSettings().cut(6)
    prefix = PrefixSettings(frozen=1, backend=backend)  # frozen < a: block 1 runs after it
    outs = {}
    for device in ("cpu", "cuda"):
        site = SitePart(tiny_model("llama").to(device), cut, LoraSettings(rank=4), 1e-2,
                        prefix=prefix, cache=(tmp_path / device, 1 << 24))
        first = site.front(batch).hidden
        again = site.front(batch).hidden  # from the cache, moved to the device
        assert again.device.type == device and torch.equal(first, again)
        outs[device] = first.detach().cpu()
    assert torch.allclose(outs["cuda"], outs["cpu"], atol=1e-4)

"""The node profile's local measurements: compute on a real (tiny) model, device and memory."""

import pytest
import torch

from fsl_edge.profile import NodeProfile, device_info, host_available_bytes, measure_compute
from fsl_edge.tiny import tiny_model


def test_compute_is_timed_on_the_model_without_touching_it():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_s, head_s = measure_compute(model, batch=2, seq=16, repeats=2)
    assert block_s > 0 and head_s > 0
    # only the input's gradient is taken: no weight gradients left behind, weights unchanged
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_compute_runs_under_no_grad_too():
    with torch.no_grad():
        block_s, _ = measure_compute(tiny_model("gpt2"), batch=1, seq=8, repeats=1)
    assert block_s > 0


def test_the_cpu_reports_its_name_and_available_memory():
    kind, name, memory = device_info(torch.device("cpu"))
    assert kind == "cpu" and "cores" in name
    assert memory > 0 and host_available_bytes() > 0


def test_a_profile_is_json():
    profile = NodeProfile(device_kind="cpu", device_name="x", memory_bytes=1 << 30, block_s=0.01,
                          head_s=0.02, ref_batch=4, ref_seq=128, up_bytes_per_s=1e6,
                          down_bytes_per_s=2e6, rtt_s=0.05)
    assert profile.ref_tokens == 512
    assert NodeProfile.model_validate_json(profile.model_dump_json()) == profile


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_reports_its_name_and_free_memory_and_is_timed():
    device = torch.device("cuda")
    kind, name, memory = device_info(device)
    free, total = torch.cuda.mem_get_info(device)
    assert kind == "cuda" and name == torch.cuda.get_device_name(device)
    assert 0 < memory <= total
    block_s, head_s = measure_compute(tiny_model("llama").to(device), batch=2, seq=16, repeats=2)
    assert block_s > 0 and head_s > 0

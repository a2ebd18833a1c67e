"""FFA-LoRA at the sites: A stays the shared random init, only B trains, so FedAvg is exact."""

import copy

import torch

from fsl_edge.aggregation import fedavg
from fsl_edge.config import LoraSettings, SplitSettings
from fsl_edge.step import ServerPart, SitePart, split_step
from fsl_edge.tiny import tiny_model

from .test_split_parity import make_batch


def test_site_a_is_frozen_and_the_average_of_b_averages_the_updates():
    base = tiny_model("llama")
    cut = SplitSettings().cut(6)
    lora = LoraSettings(rank=4, site_freeze_a=True)
    server = ServerPart(copy.deepcopy(base), cut, LoraSettings(rank=4), 1e-2)
    sites = [SitePart(copy.deepcopy(base), cut, lora, 1e-2) for _ in range(2)]
    start = sites[0].adapter()
    for site in sites:
        site.load_adapter(start)
    for i, site in enumerate(sites):
        for s in range(2):
            split_step(site, server, make_batch(seed=10 * i + s))
    ends = [site.adapter() for site in sites]
    for end in ends:
        for k in start:
            if "lora_A" in k:
                assert torch.equal(end[k], start[k]), k
        assert any(not torch.equal(end[k], start[k]) for k in start if "lora_B" in k)
    avg = fedavg(ends, [1, 1])
    # with A shared, the average of B.A is (average of B).A: exact, unlike plain FedAvg
    for k in start:
        if "lora_B" in k:
            a = start[k.replace("lora_B", "lora_A")]
            mean_of_products = (ends[0][k] @ a + ends[1][k] @ a) / 2
            assert torch.allclose(avg[k] @ a, mean_of_products, atol=1e-6)
    assert all("lora_A" not in n for n, p in sites[0].model.named_parameters()
               if p.requires_grad)

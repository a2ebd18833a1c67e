"""Parity tests that prove the split: segments composed = the full model; a split step = a
centralised LoRA step (loss and every LoRA gradient), on tiny random-init models, no network."""

import copy

import pytest
import torch

from fsl_edge.config import LoraSettings, SplitMode, SplitSettings
from fsl_edge.data import Batch
from fsl_edge.lora import adapter_state, attach, lora_gradients, load_adapter_state
from fsl_edge.split import check_parity, composed_logits, discover
from fsl_edge.step import ServerPart, SitePart, split_eval, split_step
from fsl_edge.tiny import TINY_FAMILIES, tiny_model

LORA = LoraSettings(rank=4, alpha=8)


def make_batch(seed: int = 1, B: int = 3, T: int = 10) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as collate makes it
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :3] = -100  # a prompt whose tokens carry no loss
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("cuts", [(1,), (2, 5), (1, 2, 3, 4, 5)])
def test_composed_segments_reproduce_full_logits(family, cuts):
    model = tiny_model(family)
    batch = make_batch()
    parts = discover(model)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mine = composed_logits(parts, batch.input_ids, batch.attention_mask, cuts)
    valid = batch.attention_mask.bool()
    assert torch.allclose(full[valid], mine[valid], atol=1e-5, rtol=1e-5)
    assert check_parity(parts, cuts) <= 1e-5


def randomise_adapters(*models):
    """LoRA B starts at zero, which would make every A-gradient zero: use random values."""
    g = torch.Generator().manual_seed(7)
    for m in models:
        state = adapter_state(m)
        load_adapter_state(m, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()})


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("mode", list(SplitMode))
def test_split_step_equals_centralised_step(family, mode):
    base = tiny_model(family)
    cut = SplitSettings(mode=mode, front=2, back=1 if mode is SplitMode.U_SHAPE else None).cut(6)
    site = SitePart(copy.deepcopy(base), cut, LORA, lr=1e-3)
    server = ServerPart(copy.deepcopy(base), cut, LORA, lr=1e-3)
    randomise_adapters(site.model, server.model)

    central = attach(copy.deepcopy(base), list(range(6)), LORA)
    load_adapter_state(central, {**site.adapter(), **server.adapter()})
    central.train()
    batch = make_batch()
    ref_loss = central(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       labels=batch.labels).loss
    ref_loss.backward()
    ref_grads = lora_gradients(central)

    up = site.forward_front(batch)
    if mode is SplitMode.VANILLA:
        down = server.forward("s", up)
        loss = down.loss
    else:
        grad_up, loss = site.forward_back(server.forward("s", up))
        down = server.backward("s", grad_up)
    site.backward_front(down)
    grads = {**lora_gradients(site.model), **lora_gradients(server.model)}

    assert loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert set(grads) == set(ref_grads)
    assert {k.split(".lora_")[0].split(".")[-3] for k in grads} == {str(i) for i in range(6)}
    for k, g in ref_grads.items():
        assert g.abs().sum() > 0, f"{k}: reference gradient is zero, the test would be vacuous"
        assert torch.allclose(grads[k], g, atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("mode", list(SplitMode))
def test_split_training_matches_centralised_over_steps(mode):
    """Several optimizer steps: the split run and a centralised run stay together."""
    base = tiny_model("llama")
    cut = SplitSettings(mode=mode).cut(6)
    site = SitePart(copy.deepcopy(base), cut, LORA, lr=1e-2)
    server = ServerPart(copy.deepcopy(base), cut, LORA, lr=1e-2)
    central = attach(copy.deepcopy(base), list(range(6)), LORA)
    load_adapter_state(central, {**site.adapter(), **server.adapter()})
    central.train()
    opt = torch.optim.AdamW([p for p in central.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        batch = make_batch(seed=step)
        result = split_step(site, server, batch)
        ref = central(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      labels=batch.labels).loss
        ref.backward()
        opt.step()
        opt.zero_grad()
        assert result.loss == pytest.approx(ref.item(), rel=1e-4)
    final = {**site.adapter(), **server.adapter()}
    for k, v in adapter_state(central).items():
        assert torch.allclose(final[k], v, atol=1e-5), k
    loss_sum, tokens = split_eval(site, server, make_batch(seed=99))
    with torch.no_grad():
        b = make_batch(seed=99)
        ref = central(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
    assert loss_sum / tokens == pytest.approx(ref.item(), rel=1e-4)

"""Layer selection policies: which LoRA blocks train per epoch, and what freezing saves."""

import pytest
import torch

from fsl_edge.config import LearningSettings, LoraSettings, PrefixSettings, SelectionSettings, TrainSettings
from fsl_edge.data import BatchStream, Sample, tokenize
from fsl_edge.selection import LayerSelector
from fsl_edge.simulation import SiteData, simulate
from fsl_edge.split import discover
from fsl_edge.step import ServerPart, SitePart, party_options, split_step
from fsl_edge.tiny import tiny_model, tiny_tokenizer

PAD = tiny_tokenizer().pad_token_id


def learning(policy="all", **kw) -> LearningSettings:
    return LearningSettings(lora=LoraSettings(rank=4, alpha=8),
                            train=TrainSettings(lr=1e-2, batch_size=4, max_len=48, rounds=2, steps=2),
                            selection=SelectionSettings(policy=policy, **kw),
                            prefix=PrefixSettings(backend="torch"))  # a frozen front: no export


def examples(site, n, offset=0):
    texts = [Sample("", f"{site} record {i}: " + "y" * (i % 5)) for i in range(offset, offset + n)]
    return tokenize(texts, tiny_tokenizer(), max_len=48)


def parts(settings):
    model = tiny_model("llama")
    cut = settings.split.cut(discover(model).n_blocks)
    options = party_options(settings)
    return (SitePart(tiny_model("llama"), cut, settings.lora, settings.train.lr, **options),
            ServerPart(model, cut, settings.lora, settings.train.lr, **options))


def train(site, server, epochs, n=8):
    stream = BatchStream(examples("ana", n), 4, seed=0, pad_id=PAD)
    while stream.epoch < epochs:
        split_step(site, server, next(stream))
    return stream


def lora_params(part, block):
    return [p for n, p in part.model.named_parameters() if f".layers.{block}." in n and "lora_" in n]


def test_topk_gradnorm_keeps_the_blocks_with_the_largest_gradients():
    site, server = parts(learning("topk-gradnorm", fraction=0.34))
    train(site, server, epochs=1)
    norms = dict(server.selector._sums)
    assert all(v > 0 for v in norms.values())
    site.at_epoch(1), server.at_epoch(1)
    best = max(norms, key=norms.get)
    assert server.selector.trainable == {best}  # 3 trunk blocks x 0.34 -> 1
    assert len(site.selector.trainable) == 1
    for block in server.selector.blocks:
        for p in lora_params(server, block):
            assert p.requires_grad is (block == best)
    # a frozen block gets no gradient and has no optimizer state after the next steps
    stream = BatchStream(examples("ana", 8), 4, seed=0, pad_id=PAD)
    split_step(site, server, next(stream))
    for block in set(server.selector.blocks) - {best}:
        for p in lora_params(server, block):
            assert p.grad is None and p not in server.optimizer.state
    for p in lora_params(server, best):
        assert p in server.optimizer.state


def test_blocks_frozen_keep_their_last_norm_and_can_come_back():
    model = tiny_model("llama")
    from fsl_edge.lora import attach

    peft = attach(model, [0, 1, 2], LoraSettings(rank=2))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    sel = LayerSelector(peft, "layers", [0, 1, 2], SelectionSettings(policy="topk-gradnorm",
                                                                     fraction=0.34), seed=0)

    def fake_epoch(epoch, grads):
        for b, g in grads.items():
            for p in sel.params[b]:
                p.grad = torch.full_like(p, g)
        sel.observe()
        return sel.at_epoch(epoch, opt)

    fake_epoch(1, {0: 1.0, 1: 3.0, 2: 2.0})
    assert sel.trainable == {1}
    fake_epoch(2, {1: 0.5})  # the trained block's gradients fell below block 2's last norm
    assert sel.trainable == {2}
    assert [c for _, c in sel.history] == [[0, 1, 2], [1], [2]]


def test_random_selection_has_the_same_budget_and_is_reproducible():
    a = parts(learning("random", fraction=0.34))
    b = parts(learning("random", fraction=0.34))
    for site, server in (a, b):
        for epoch in range(1, 4):
            server.at_epoch(epoch)
    assert [c for _, c in a[1].selector.history] == [c for _, c in b[1].selector.history]
    assert all(len(c) == 1 for _, c in a[1].selector.history[1:])


def test_freeze_front_grows_the_sites_cacheable_prefix():
    site, server = parts(learning("freeze-front", threshold=100.0))  # any change counts as settled
    assert site.frozen_front == 0 and site.front_trains
    train(site, server, epochs=2)
    site.at_epoch(2), server.at_epoch(2)
    # both front blocks froze, from the front; the back block (5) keeps training
    assert site.selector.trainable == {5} and site.frozen_front == 2 and not site.front_trains
    assert server.selector.trainable == {4}  # at least one block always trains
    up = site.forward_front(next(BatchStream(examples("ana", 4), 4, seed=0, pad_id=PAD)))
    assert up.need_grad is False
    patient = parts(learning("freeze-front", threshold=1e-9))
    train(*patient, epochs=2)
    patient[0].at_epoch(2)
    assert patient[0].selector.trainable == {0, 1, 5}


def test_selector_state_round_trips():
    site, server = parts(learning("topk-gradnorm"))
    train(site, server, epochs=2)
    site.at_epoch(2)
    state = site.selector.state_dict()
    other, _ = parts(learning("topk-gradnorm"))
    other.selector.load_state_dict(state, other.optimizer)
    assert other.selector.trainable == site.selector.trainable
    assert other.selector.history == site.selector.history and other.selector.norms == site.selector.norms


@pytest.mark.parametrize("policy", ["topk-gradnorm", "freeze-front", "random"])
def test_a_selective_run_learns_and_reports_its_layers(policy):
    sites = [SiteData(n, examples(n, 8), examples(n, 4, 50)) for n in ("ana", "bo")]
    settings = learning(policy, fraction=0.5, threshold=0.5).model_copy(
        update={"train": TrainSettings(lr=1e-2, batch_size=4, max_len=48, rounds=3, steps=2)})
    result = simulate(tiny_model("llama"), sites, settings, PAD)
    assert result.rounds[-1].heldout_loss_all < result.rounds[0].heldout_loss_all
    assert set(result.rounds[-1].layers) == {"server", "ana", "bo"}
    assert 1 <= len(result.rounds[-1].layers["server"]) <= 3

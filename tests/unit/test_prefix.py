"""The frozen prefix and its activation cache: bit-exact hits, invalidation, recovery from a
corrupted entry, eviction, keys instead of activations, and runs that learn exactly the same
with the cache as without it."""

import pytest
import torch

from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings, PrefixSettings,
                             SplitSettings, TrainSettings)
from fsl_edge.data import BatchStream, Sample, tokenize
from fsl_edge.errors import ProtocolError, SplitError
from fsl_edge.messages import ACTIVATION_UP, ActivationUp
from fsl_edge.prefix import MissingKeys, PrefixStore
from fsl_edge.simulation import SiteData, simulate
from fsl_edge.split import discover
from fsl_edge.step import ServerPart, SitePart, party_options, split_step
from fsl_edge.tiny import tiny_model, tiny_tokenizer

PAD = tiny_tokenizer().pad_token_id


def settings(frozen=2, send_keys=False, steps=4, rounds=2, backend="torch", **prefix) -> LearningSettings:
    # torch unless a test is about ONNX Runtime: an export takes seconds
    return LearningSettings(
        lora=LoraSettings(rank=4, alpha=8),
        train=TrainSettings(lr=1e-2, batch_size=4, max_len=48, rounds=rounds, steps=steps, seed=0),
        compression=CompressionSettings(preset="none"),
        prefix=PrefixSettings(frozen=frozen, send_keys=send_keys, backend=backend, **prefix))


def examples(site: str, n: int, offset: int = 0):
    # lengths vary, so batches are padded and a batched prefix would round differently
    texts = [Sample("", f"{site} note {i}: " + "x" * (i % 7)) for i in range(offset, offset + n)]
    return tokenize(texts, tiny_tokenizer(), max_len=48)


def sites(n_train=8):
    return [SiteData(name, examples(name, n_train), examples(name, 4, 100)) for name in ("ana", "bo")]


def site_part(learning: LearningSettings, cache=None, model=None) -> SitePart:
    model = model or tiny_model("llama")
    cut = learning.split.cut(discover(model).n_blocks)
    return SitePart(model, cut, learning.lora, learning.train.lr, **party_options(learning),
                    cache=cache)


def batches(n=2):
    stream = BatchStream(examples("ana", 8), 4, seed=0, pad_id=PAD)
    return [next(stream) for _ in range(n)]


def test_cached_prefix_outputs_are_bit_identical_to_recomputed(tmp_path):
    learning = settings()
    part = site_part(learning, cache=(tmp_path, 1 << 24))
    batch = batches(1)[0]
    first, fp = part.prefix.batch(batch, 2)
    assert part.prefix.cache.stats.misses == 4 and part.prefix.computed == 4
    second, fp2 = part.prefix.batch(batch, 2)
    assert part.prefix.cache.stats.hits == 4 and part.prefix.computed == 4  # nothing recomputed
    assert fp == fp2 and torch.equal(first, second)
    # and equal to a fresh computation without any cache
    fresh, _ = site_part(learning).prefix.batch(batch, 2)
    assert torch.equal(first, fresh)
    # padding positions are zeros; valid ones equal the sample computed alone
    n0 = int(batch.attention_mask[0].sum())
    assert n0 < batch.attention_mask.shape[1] and (first[0, n0:] == 0).all()


def test_the_cache_survives_a_restart(tmp_path):
    learning = settings()
    batch = batches(1)[0]
    before, _ = site_part(learning, cache=(tmp_path, 1 << 24)).prefix.batch(batch, 2)
    again = site_part(learning, cache=(tmp_path, 1 << 24))
    after, _ = again.prefix.batch(batch, 2)
    assert again.prefix.cache.stats.hits == 4 and again.prefix.computed == 0
    assert torch.equal(before, after)


def test_a_changed_prefix_weight_or_cut_invalidates_the_cache(tmp_path):
    learning = settings()
    batch = batches(1)[0]
    site_part(learning, cache=(tmp_path, 1 << 24)).prefix.batch(batch, 2)
    changed = tiny_model("llama")
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    part = site_part(learning, cache=(tmp_path, 1 << 24), model=changed)
    out, _ = part.prefix.batch(batch, 2)
    assert part.prefix.cache.stats.hits == 0 and part.prefix.computed == 4
    assert part.prefix.cache.stats.invalidated >= 4  # the old entries are gone from disk
    # a shorter prefix (another cut) is another fingerprint too
    assert part.prefix.fingerprint(1) != part.prefix.fingerprint(2)
    # a change above the prefix does not invalidate it
    above = tiny_model("llama")
    with torch.no_grad():
        above.model.layers[3].mlp.down_proj.weight[0, 0] += 1e-3
    assert site_part(learning, model=above).prefix.fingerprint(2) == site_part(learning).prefix.fingerprint(2)


def test_a_corrupted_entry_is_recomputed(tmp_path):
    learning = settings()
    batch = batches(1)[0]
    part = site_part(learning, cache=(tmp_path, 1 << 24))
    good, _ = part.prefix.batch(batch, 2)
    files = sorted(part.prefix.cache.dir.glob("*.act"))
    assert len(files) == 4
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:10])
    again, _ = part.prefix.batch(batch, 2)
    stats = part.prefix.cache.stats
    assert stats.corrupt == 2 and part.prefix.computed == 6
    assert torch.equal(good, again)


def test_the_cache_stays_under_its_bound(tmp_path):
    learning = settings()
    part = site_part(learning, cache=(tmp_path, 3 * 40 * 32 * 4))  # ~3 samples of <= 40 tokens
    for batch in batches(2):
        part.prefix.batch(batch, 2)
    stats = part.prefix.cache.stats
    assert stats.evictions > 0 and stats.bytes <= 3 * 40 * 32 * 4


def test_the_whole_front_frozen_sends_no_gradient_down():
    learning = settings(frozen=2)
    model = tiny_model("llama")
    cut = learning.split.cut(discover(model).n_blocks)
    site = site_part(learning, model=model)
    server = ServerPart(tiny_model("llama"), cut, learning.lora, learning.train.lr, **party_options(learning))
    up = site.forward_front(batches(1)[0])
    assert up.need_grad is False and not up.hidden.requires_grad
    down = server.forward(0, up)
    grad_up, _ = site.forward_back(down)
    assert server.backward(0, grad_up).grad is None
    # the site's adapter has no front blocks at all
    assert not any(".layers.0." in k or ".layers.1." in k for k in site.adapter())


def test_keys_stand_for_activations_the_server_holds():
    learning = settings(frozen=2, send_keys=True)
    model = tiny_model("llama")
    cut = learning.split.cut(discover(model).n_blocks)
    site = site_part(learning, model=model)
    site.data_digest = "d"
    server = ServerPart(tiny_model("llama"), cut, learning.lora, learning.train.lr, **party_options(learning))
    stream = BatchStream(examples("ana", 8), 4, seed=0, pad_id=PAD)
    sent = []
    for _ in range(4):  # two epochs of two batches
        result = split_step(site, server, next(stream), key=0)
        sent.append(result.bytes[ACTIVATION_UP])
    assert sent[2] < sent[0] / 5 and sent[3] < sent[1] / 5  # epoch 2: keys, mask and positions
    assert server.store.hits == 8 and len(server.store.entries) == 8


def test_keys_the_server_lost_are_sent_again():
    learning = settings(frozen=2, send_keys=True)
    model = tiny_model("llama")
    cut = learning.split.cut(discover(model).n_blocks)
    site = site_part(learning, model=model)
    server = ServerPart(tiny_model("llama"), cut, learning.lora, learning.train.lr, **party_options(learning))
    stream = BatchStream(examples("ana", 4), 4, seed=0, pad_id=PAD)
    split_step(site, server, next(stream), key=0)
    server.store = PrefixStore(1 << 20)  # as after a restart of the coordinator
    with pytest.raises(MissingKeys):
        server.forward(1, site.forward_front(next(stream)))
    site._pending = None
    result = split_step(site, server, next(stream), key=0)  # split_step resends with activations
    assert result.bytes[ACTIVATION_UP] > 4 * 10 * 32 * 4 and len(server.store.entries) == 4


def test_a_prefix_store_drops_a_sites_copies_when_its_prefix_changes():
    store = PrefixStore(1 << 20)
    mask = torch.ones(2, 3, dtype=torch.long)
    store.put("ana", "fp1", [0, 1], torch.randn(2, 3, 8), mask)
    store.put("bo", "fp1", [0], torch.randn(1, 3, 8), mask[:1])
    store.put("ana", "fp2", [5], torch.randn(1, 3, 8), mask[:1])
    with pytest.raises(MissingKeys) as e:
        store.get("ana", "fp2", [0, 5], mask)
    assert e.value.missing == [0]
    assert store.get("bo", "fp1", [0], mask[:1]).shape == (1, 3, 8)
    small = PrefixStore(3 * 8 * 4 * 2)  # two samples
    small.put("ana", "f", [0, 1], torch.randn(2, 3, 8), mask)
    small.put("ana", "f", [2], torch.randn(1, 3, 8), mask[:1])
    assert small.evicted == 1 and ("ana", "f", 0) not in small.entries


@pytest.mark.parametrize("send_keys", [False, True])
def test_a_run_with_the_cache_learns_exactly_what_a_run_without_it_learns(tmp_path, send_keys):
    learning = settings(frozen=2, send_keys=send_keys, steps=2, rounds=3)  # a round = an epoch
    plain = simulate(tiny_model("llama"), sites(), learning, PAD)
    cached = simulate(tiny_model("llama"), sites(), learning, PAD, cache_dir=tmp_path)
    for a, b in ((plain.site_adapter, cached.site_adapter), (plain.server_adapter, cached.server_adapter)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epoch2 = cached.rounds[2]
    assert epoch2.cache["hits"] == 2 * 8 and epoch2.cache["misses"] == 0
    if send_keys:
        assert epoch2.bytes[ACTIVATION_UP] < cached.rounds[1].bytes[ACTIVATION_UP] / 5
    # a second run on the warm cache computes no prefix at all and still learns the same
    warm = simulate(tiny_model("llama"), sites(), learning, PAD, cache_dir=tmp_path)
    assert warm.rounds[1].cache["misses"] == 0
    assert all(torch.equal(warm.site_adapter[k], cached.site_adapter[k]) for k in warm.site_adapter)


def test_a_frozen_prefix_changes_what_trains_but_still_learns():
    result = simulate(tiny_model("llama"), sites(), settings(frozen=1, steps=4, rounds=3), PAD)
    assert result.rounds[-1].heldout_loss_all < result.rounds[0].heldout_loss_all
    assert not any(".layers.0." in k for k in result.site_adapter)
    assert any(".layers.1." in k for k in result.site_adapter)


def test_bad_prefix_settings_are_refused():
    with pytest.raises(ValueError, match="send_keys needs a frozen prefix"):
        PrefixSettings.model_validate({"send_keys": True}) and LearningSettings(
            prefix=PrefixSettings(send_keys=True))
    with pytest.raises(ValueError, match="backend"):
        PrefixSettings(backend="tensorflow")
    cut = SplitSettings().cut(6)
    with pytest.raises(SplitError, match="more than the site's 2 front blocks"):
        LearningSettings(prefix=PrefixSettings(frozen=3)).check_prefix(cut)
    with pytest.raises(SplitError, match="send_keys needs prefix.frozen = the cut a"):
        LearningSettings(prefix=PrefixSettings(frozen=1, send_keys=True)).check_prefix(cut)


def test_keys_without_a_fingerprint_or_of_the_wrong_shape_are_refused():
    mask = torch.ones(2, 3, dtype=torch.long)
    pos = torch.arange(3).expand(2, 3)
    with pytest.raises(ProtocolError, match="fingerprint"):
        ActivationUp(None, mask, pos, keys=torch.tensor([0, 1])).validate(8)
    with pytest.raises(ProtocolError, match="non-negative int64"):
        ActivationUp(None, mask, pos, keys=torch.tensor([0, -1]), prefix="ab").validate(8)
    with pytest.raises(ProtocolError, match="needs keys"):
        ActivationUp(None, mask, pos).validate(8)


def test_onnx_runtime_computes_the_prefix_and_says_where(tmp_path):
    batch = batches(1)[0]
    ort_part = site_part(settings(backend="auto"), cache=(tmp_path, 1 << 24))  # auto: ORT on a CPU
    out, fp = ort_part.prefix.batch(batch, 2)
    assert ort_part.prefix.provider == "onnxruntime CPUExecutionProvider"
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [f"{fp}.onnx"]  # exported once
    reference, fp_torch = site_part(settings()).prefix.batch(batch, 2)
    assert fp != fp_torch  # the backend is part of what the cache is keyed by
    assert torch.allclose(out, reference, rtol=0, atol=1e-4 * reference.abs().max().item())
    # a restart reuses the export and the cached outputs, bit for bit
    again = site_part(settings(backend="auto"), cache=(tmp_path, 1 << 24))
    assert torch.equal(again.prefix.batch(batch, 2)[0], out) and again.prefix.computed == 0


def test_an_onnx_runtime_prefix_learns_the_same_with_and_without_its_cache(tmp_path):
    learning = settings(frozen=2, steps=2, rounds=2, backend="onnxruntime")
    plain = simulate(tiny_model("llama"), sites(), learning, PAD)
    cached = simulate(tiny_model("llama"), sites(), learning, PAD, cache_dir=tmp_path)
    assert all(torch.equal(plain.site_adapter[k], cached.site_adapter[k]) for k in plain.site_adapter)
    assert all(torch.equal(plain.server_adapter[k], cached.server_adapter[k]) for k in plain.server_adapter)


def test_vanilla_sites_with_every_block_frozen_send_keys_and_labels_only(tmp_path):
    # the activation-caching report's design: the sites train nothing, the server the rest
    learning = settings(frozen=2, send_keys=True, steps=2, rounds=3).model_copy(
        update={"split": SplitSettings(mode="vanilla")})
    plain = simulate(tiny_model("llama"), sites(), learning.model_copy(
        update={"prefix": PrefixSettings(frozen=2, backend="torch")}), PAD)
    keyed = simulate(tiny_model("llama"), sites(), learning, PAD, cache_dir=tmp_path)
    assert keyed.site_adapter == {} and plain.site_adapter == {}
    assert all(torch.equal(plain.server_adapter[k], keyed.server_adapter[k]) for k in plain.server_adapter)
    assert keyed.rounds[-1].heldout_loss_all < keyed.rounds[0].heldout_loss_all
    # epoch 1 sends the activations; later epochs keys, masks, positions and labels (int64,
    # 3 x 8 bytes a token against 32 x 4 + 24 in full for the tiny model; 1 % on SmolLM2)
    assert keyed.rounds[1].bytes[ACTIVATION_UP] > plain.rounds[1].bytes[ACTIVATION_UP]  # + keys
    for r in (2, 3):
        assert keyed.rounds[r].bytes[ACTIVATION_UP] < plain.rounds[r].bytes[ACTIVATION_UP] * 0.2
    assert keyed.rounds[2].bytes["adapter_up"] == 0 and keyed.rounds[2].bytes["gradient_down"] == 0


def test_a_site_cannot_jump_the_trunks_epoch():
    learning = settings(frozen=0)
    model = tiny_model("llama")
    cut = learning.split.cut(discover(model).n_blocks)
    site = site_part(learning, model=tiny_model("llama"))
    server = ServerPart(model, cut, learning.lora, learning.train.lr, **party_options(learning))
    up = site.forward_front(batches(1)[0])
    up.epoch = 10**18
    with pytest.raises(ProtocolError, match="epoch 1000000000000000000 from ana is outside 0..1"):
        server.forward(0, up, site="ana")
    up.epoch = -1
    with pytest.raises(ProtocolError, match="outside"):
        server.forward(0, up, site="ana")
    up.epoch = 1
    server.forward(0, up, site="ana")
    assert server.selector.epoch == 1


def test_what_agents_report_about_their_cache_and_layers_is_checked():
    from fsl_edge.coordinator.coordinator import reported_cache, reported_layers

    assert reported_cache({"cache": {"hits": 3, "hit_rate": 0.5}}) == {"hits": 3.0, "hit_rate": 0.5}
    assert reported_cache({"cache": {"hits": float("inf"), "misses": 10**400, "x": True}}) == {}
    assert reported_cache({"cache": "lots"}) == {}
    assert reported_layers({"layers": [[0, [1, 2]], [1, [2]]]}) == [(0, [1, 2]), (1, [2])]
    assert reported_layers({"layers": [[0, ["a"]]]}) == [] and reported_layers({}) == []

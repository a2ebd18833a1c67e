"""The in-process simulation: it learns, its byte accounting matches the shapes, its aggregate is
the token-weighted FedAvg of the site uploads, and the same seed gives the same run."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fsl_edge import simulation
from fsl_edge.config import LoraSettings, SplitSettings, TrainSettings
from fsl_edge.data import Sample, tokenize
from fsl_edge.icd10_data import DEFAULT_CHAPTERS, build_icd10
from fsl_edge.messages import (
    ACTIVATION_DOWN,
    ACTIVATION_UP,
    ADAPTER_DOWN,
    ADAPTER_UP,
    GRADIENT_DOWN,
    GRADIENT_UP,
    KINDS,
)
from fsl_edge.runs import run_simulation, summary
from fsl_edge.config import CompressionSettings, LearningSettings
from fsl_edge.simulation import SiteData, simulate
from fsl_edge.step import SitePart
from fsl_edge.tiny import tiny_model, tiny_tokenizer

B, ROUNDS, STEPS, RANK = 4, 2, 3, 4
C = 32  # hidden size of the tiny models
SETTINGS = LearningSettings(
    lora=LoraSettings(rank=RANK, alpha=8),
    train=TrainSettings(lr=1e-2, batch_size=B, max_len=64, rounds=ROUNDS, steps=STEPS, seed=0),
    compression=CompressionSettings(preset="none"),  # plain fp32: bytes are the tensors' sizes
)
# Each site's texts have one fixed length, so every batch of that site is (B, T) with T known:
# the byte-level tiny tokenizer gives one token per character, plus the eos.
TEMPLATES = {"cats": "{:03d} the cat sat on the mat.", "dogs": "{:03d} a dog ran round the big park."}
T = {name: len(t.format(0)) + 1 for name, t in TEMPLATES.items()}


def make_sites(n_train: int = 120, n_heldout: int = 8) -> list[SiteData]:
    tok = tiny_tokenizer()
    sites = []
    for name, template in TEMPLATES.items():
        texts = [Sample("", template.format(i)) for i in range(n_train + n_heldout)]
        examples = tokenize(texts, tok, max_len=64)
        assert {len(e.input_ids) for e in examples} == {T[name]}
        sites.append(SiteData(name, examples[:n_train], examples[n_train:]))
    return sites


def run(seed: int = 0, record=None):
    settings = SETTINGS.model_copy(update={"train": SETTINGS.train.model_copy(update={"seed": seed})})
    return simulate(tiny_model("llama"), make_sites(), settings, pad_id=tiny_tokenizer().pad_token_id,
                    on_round=record)


@pytest.fixture(scope="module")
def recorded():
    """One run, with every aggregation and every on_round callback recorded."""
    calls, rounds = [], []
    real = simulation.aggregate_round

    def recording_aggregate(global_, deltas, weights, *args):
        out, outcome = real(global_, deltas, weights, *args)
        calls.append(([copy.deepcopy(s) for s in deltas], list(weights), outcome.mean,
                      copy.deepcopy(global_), out))
        return out, outcome

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "aggregate_round", recording_aggregate)
        result = run(record=rounds.append)
    return result, calls, rounds


def site_adapter_floats(n_blocks: int) -> int:
    """LoRA weights per adapter by hand: rank r on q, k, v, o of the tiny Llama (C=32, 4 heads of
    8, 2 kv heads -> k and v project to 16). A is (r, in), B is (out, r)."""
    q = o = RANK * C + C * RANK
    k = v = RANK * C + 16 * RANK
    return n_blocks * (q + k + v + o)


def test_training_lowers_the_held_out_loss(recorded):
    result, _, _ = recorded
    before, after = result.rounds[0], result.rounds[-1]
    assert after.heldout_loss_all < before.heldout_loss_all - 0.1
    for name in TEMPLATES:
        assert after.heldout_loss[name] < before.heldout_loss[name], name
    assert summary(result.rounds)["heldout_after"] == after.heldout_loss_all


def test_rounds_are_reported_once_each_in_order(recorded):
    result, _, rounds = recorded
    assert [r.round for r in result.rounds] == list(range(ROUNDS + 1))
    assert rounds == result.rounds
    first = result.rounds[0]  # before training: evaluated, nothing trained or sent
    assert first.train_loss == {} and first.tokens == {} and first.bytes == {}
    assert set(first.heldout_loss) == set(TEMPLATES)


def test_tokens_are_the_loss_carrying_targets_of_every_step(recorded):
    result, _, _ = recorded
    for r in result.rounds[1:]:
        # every position but the first is a target (no prompt, no padding)
        assert r.tokens == {name: STEPS * B * (T[name] - 1) for name in TEMPLATES}
        assert all(0 < loss < 10 for loss in r.train_loss.values())


def test_bytes_per_kind_match_the_tensor_shapes(recorded):
    result, _, _ = recorded
    hidden = {name: B * T[name] * C * 4 for name in TEMPLATES}  # fp32 (B, T, C)
    mask_and_positions = {name: 2 * B * T[name] * 8 for name in TEMPLATES}  # int64 (B, T) each
    adapter = site_adapter_floats(n_blocks=3) * 4  # site runs blocks 0, 1 and 5 of 6
    assert adapter == sum(t.numel() * t.element_size() for t in result.site_adapter.values())
    expected = {
        ACTIVATION_UP: STEPS * sum(hidden[n] + mask_and_positions[n] for n in TEMPLATES),
        ACTIVATION_DOWN: STEPS * sum(hidden.values()),
        GRADIENT_UP: STEPS * sum(hidden.values()),
        GRADIENT_DOWN: STEPS * sum(hidden.values()),
        ADAPTER_UP: len(TEMPLATES) * adapter,
        ADAPTER_DOWN: len(TEMPLATES) * adapter,
    }
    assert set(expected) == set(KINDS)
    for r in result.rounds[1:]:
        assert r.bytes == expected


def test_the_site_adapter_moves_by_the_token_weighted_mean_of_the_uploaded_deltas(recorded):
    result, calls, _ = recorded
    assert len(calls) == ROUNDS
    keys = set(SitePart(tiny_model("llama"), SplitSettings().cut(6), SETTINGS.lora, 1e-3).adapter())
    for (deltas, weights, mean, before, after), r in zip(calls, result.rounds[1:]):
        assert weights == [r.tokens[name] for name in TEMPLATES]
        assert all(set(u) == keys for u in deltas)
        assert not torch.equal(*(u[next(iter(keys))] for u in deltas))  # the sites did differ
        for k in keys:
            by_hand = sum(u[k].double() * w for u, w in zip(deltas, weights)) / sum(weights)
            assert torch.allclose(mean[k].double(), by_hand, atol=1e-9), k
            assert torch.equal(after[k], before[k] + mean[k]), k  # server lr 1: FedAvg
    assert set(result.site_adapter) == keys
    assert all(torch.equal(v, calls[-1][4][k]) for k, v in result.site_adapter.items())


def test_each_side_holds_only_its_own_blocks(recorded):
    result, _, _ = recorded

    def blocks(state):
        return {int(k.split(".layers.")[1].split(".")[0]) for k in state}

    assert blocks(result.site_adapter) == {0, 1, 5}
    assert blocks(result.server_adapter) == {2, 3, 4}
    assert result.metadata["cut"]["a"] == 2 and result.metadata["cut"]["b"] == 5
    assert result.metadata["sites"] == list(TEMPLATES)


def test_the_same_seed_gives_the_same_run(recorded):
    first, _, _ = recorded
    again = run(seed=0)
    for mine, theirs in ((first.site_adapter, again.site_adapter),
                         (first.server_adapter, again.server_adapter)):
        assert set(mine) == set(theirs)
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k
    assert [r.heldout_loss_all for r in again.rounds] == [r.heldout_loss_all for r in first.rounds]
    assert [r.train_loss for r in again.rounds] == [r.train_loss for r in first.rounds]


def test_another_seed_gives_another_run(recorded):
    first, _, _ = recorded
    other = run(seed=1)
    assert any(not torch.equal(v, other.site_adapter[k]) for k, v in first.site_adapter.items())


def test_run_simulation_writes_metrics_and_adapters(tmp_path):
    data = tmp_path / "data"
    build_icd10(data, per_site=40, heldout=8)
    out = tmp_path / "run"
    settings = LearningSettings(
        lora=LoraSettings(rank=2, alpha=4),
        train=TrainSettings(lr=1e-3, batch_size=4, max_len=32, rounds=1, steps=2, seed=0))

    result = run_simulation("tiny-random-gpt2", data, out, settings)

    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "server_adapter.safetensors", "site_adapter.safetensors"]
    for name, expected in (("site", result.site_adapter), ("server", result.server_adapter)):
        path = out / f"{name}_adapter.safetensors"
        saved = load_file(path)
        assert set(saved) == set(expected) and saved
        for k in saved:
            assert torch.equal(saved[k], expected[k]), k
        with safe_open(path, "pt") as f:
            assert f.metadata()["model"] == "tiny-random-gpt2"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "tiny-random-gpt2" and metrics["data"] == str(data)
    assert metrics["sites"] == sorted(DEFAULT_CHAPTERS)
    assert metrics["settings"]["train"]["steps"] == 2
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert set(metrics["rounds"][1]["tokens"]) == set(DEFAULT_CHAPTERS)
    assert all(n > 0 for n in metrics["rounds"][1]["tokens"].values())
    assert metrics["rounds"][1]["heldout_loss_all"] == result.rounds[1].heldout_loss_all

"""A cut and a LoRA rank per node in the engine: the simulation of sites at different cuts and
ranks equals the pure functions composed by hand, and the trunk refuses cuts it does not serve."""

import copy

import pytest
import torch
from pydantic import ValidationError

from fsl_edge.config import LearningSettings, LoraSettings, SplitSettings, TrainSettings
from fsl_edge.data import BatchStream, Sample, tokenize
from fsl_edge.errors import ConfigError, ProtocolError
from fsl_edge.hetero import aggregate, hand_back, server_block_weights
from fsl_edge.messages import ActivationUp
from fsl_edge.nodes import initial_global, node_setup
from fsl_edge.planner import NodePlan, Plan
from fsl_edge.simulation import SiteData, simulate, site_seed
from fsl_edge.step import ServerPart, SitePart, party_options, split_step
from fsl_edge.tiny import tiny_model, tiny_tokenizer

PAD = tiny_tokenizer().pad_token_id
B, STEPS, ROUNDS = 4, 2, 2
# tiny llama: 6 blocks. x: site 0 | 5, y: site 0-1 | 5, z: site 0-2 | 4-5 (u-shape)
PINS = {"x": {"front": 1, "back": 1, "rank": 2}, "y": {"front": 2, "back": 1, "rank": 4},
        "z": {"front": 3, "back": 2, "rank": 8}}
CUTS = {"x": (1, 5), "y": (2, 5), "z": (3, 4)}
TEMPLATES = {"x": "{:03d} the cat sat on the mat.", "y": "{:03d} a dog ran round the park.",
             "z": "{:03d} birds sing at dawn."}


def settings(pins=PINS, enabled: bool = False, **kw) -> LearningSettings:
    return LearningSettings(
        lora=LoraSettings(rank=4, alpha=8),
        train=TrainSettings(lr=1e-2, batch_size=B, rounds=ROUNDS, steps=STEPS, seed=0),
        compression={"preset": "none"}, planner={"pins": pins, "enabled": enabled}, **kw)


def sites() -> list[SiteData]:
    tok, out = tiny_tokenizer(), []
    for name, template in TEMPLATES.items():
        ex = tokenize([Sample("", template.format(i)) for i in range(24)], tok, max_len=64)
        out.append(SiteData(name, ex[:20], ex[20:]))
    return out


def by_hand(model, data: list[SiteData], learning: LearningSettings):
    """The same rounds from SitePart, ServerPart, split_step and hetero's pure functions."""
    train, lora = learning.train, learning.lora
    torch.manual_seed(train.seed)
    opts = party_options(learning)
    cuts = {n: SplitSettings(front=p["front"], back=p["back"]).cut(6) for n, p in PINS.items()}
    server = ServerPart(copy.deepcopy(model), cuts["x"], lora, train.lr, cuts=CUTS.values(), **opts)
    parts = {n: SitePart(copy.deepcopy(model), cuts[n], lora.model_copy(update={"rank": p["rank"]}),
                         train.lr, **opts) for n, p in PINS.items()}
    global_ = initial_global(model, lora, 8, train.seed)
    for part in [server, *parts.values()]:
        part.load_adapter(hand_back(global_, part.adapter(), lora.alpha))
    streams = {s.name: BatchStream(s.train, B, site_seed(train.seed, s.name), PAD) for s in data}
    for _ in range(ROUNDS):
        bases = {n: p.adapter() for n, p in parts.items()}
        tokens = dict.fromkeys(parts, 0)
        for _ in range(STEPS):
            for i, (name, part) in enumerate(parts.items()):
                tokens[name] += split_step(part, server, next(streams[name]), key=i).tokens
        trunk = server.adapter()
        # sites upload deltas against what they were handed: the coordinator adds them back
        parties = [({k: bases[n][k] + (v - bases[n][k]) for k, v in parts[n].adapter().items()},
                    tokens[n]) for n in parts]
        parties.append((trunk, server_block_weights(CUTS, tokens)))
        global_ = aggregate(parties, "pad", alpha=lora.alpha)
        server.load_adapter(hand_back(global_, trunk, lora.alpha))
        for part in parts.values():
            part.load_adapter(hand_back(global_, part.adapter(), lora.alpha))
    return global_, server.adapter(), {n: p.adapter() for n, p in parts.items()}


@pytest.fixture(scope="module")
def hetero_run():
    return simulate(tiny_model("llama"), sites(), settings(), PAD)


def test_three_sites_at_different_cuts_and_ranks_equal_the_pure_functions_composed(hetero_run):
    global_, trunk, _ = by_hand(tiny_model("llama"), sites(), settings())
    assert set(hetero_run.site_adapter) == set(global_)
    for k, v in global_.items():
        assert torch.equal(hetero_run.site_adapter[k], v), k
    assert set(hetero_run.server_adapter) == set(trunk)
    for k, v in trunk.items():
        assert torch.equal(hetero_run.server_adapter[k], v), k
    assert hetero_run.metadata["nodes"]["z"] == {"a": 3, "b": 4, "rank": 8}


def test_the_trunk_holds_the_union_of_the_trunks_at_its_rank_and_the_global_every_block(hetero_run):
    blocks = lambda s: {int(k.split("layers.")[1].split(".")[0]) for k in s}  # noqa: E731
    assert blocks(hetero_run.server_adapter) == {1, 2, 3, 4}
    assert {v.shape[0] for k, v in hetero_run.server_adapter.items() if "lora_A" in k} == {4}
    assert blocks(hetero_run.site_adapter) == set(range(6))
    # block 0 is held by every site: padded to the largest rank among them
    a0 = [v for k, v in hetero_run.site_adapter.items() if ".0." in k and "lora_A" in k]
    assert {v.shape[0] for v in a0} == {8}


def test_training_across_cuts_lowers_every_sites_held_out_loss(hetero_run):
    first, last = hetero_run.rounds[0].heldout_loss, hetero_run.rounds[-1].heldout_loss
    assert all(last[n] < first[n] for n in TEMPLATES)


def test_one_pinned_cut_for_everyone_is_the_homogeneous_run_bit_for_bit():
    same = {n: {"front": 1, "back": 2} for n in TEMPLATES}
    pinned = simulate(tiny_model("llama"), sites(), settings(same), PAD)
    plain = simulate(tiny_model("llama"), sites(), settings({}).model_copy(
        update={"split": SplitSettings(front=1, back=2)}), PAD)
    assert "nodes" not in pinned.metadata
    for k, v in plain.site_adapter.items():
        assert torch.equal(pinned.site_adapter[k], v)
    assert [r.heldout_loss_all for r in pinned.rounds] == [r.heldout_loss_all for r in plain.rounds]


def test_a_cut_the_server_does_not_serve_is_refused_with_the_cuts_it_serves():
    cut = SplitSettings(front=2, back=1).cut(6)
    server = ServerPart(tiny_model("llama"), cut, LoraSettings(rank=2), 1e-2, cuts=[(2, 5), (1, 5)])
    h, mask = torch.zeros(1, 4, 32), torch.ones(1, 4, dtype=torch.int64)
    pos = torch.arange(4)[None]
    with pytest.raises(ProtocolError, match=r"cut \(3, 5\) is not served .* serves \(1, 5\), \(2, 5\)"):
        server.forward(0, ActivationUp(h, mask, pos, a=3, b=5))
    with pytest.raises(ProtocolError, match="give both or neither"):
        server.forward(0, ActivationUp(h, mask, pos, a=2))
    server.forward(0, ActivationUp(h, mask, pos, a=1, b=5))  # served
    server.forward(1, ActivationUp(h, mask, pos))  # no cut named: the server's own (2, 5)


def test_a_node_takes_the_plan_then_its_pin_then_the_runs_split():
    s = settings({"y": {"front": 2, "rank": 16}})
    plan = Plan(mode="u-shape", makespan_s=1, server_busy_s=1, bottleneck="x", nodes={"x": NodePlan(
        a=3, b=4, rank=8, codec="lossless", step_s=1, round_s=1, site_s=1, wire_s=0, server_s=0,
        sync_s=0, memory_bytes=1)})
    assert (node_setup(s, 6, "x", plan).ab, node_setup(s, 6, "x", plan).lora.rank) == ((3, 4), 8)
    assert (node_setup(s, 6, "y").ab, node_setup(s, 6, "y").lora.rank) == ((2, 5), 16)
    assert (node_setup(s, 6, "w").ab, node_setup(s, 6, "w").lora.rank) == ((2, 5), 4)


def test_the_planner_settings_are_validated_and_off_by_default():
    assert LearningSettings().planner.enabled is False
    with pytest.raises(ValidationError, match="rank"):
        LearningSettings(planner={"pins": {"x": {"rank": 0}}})
    with pytest.raises(ValidationError, match="extra"):
        LearningSettings(planner={"pins": {"x": {"cut": 2}}})
    with pytest.raises(ConfigError, match="needs the plan"):
        simulate(tiny_model("llama"), sites(), settings(enabled=True), PAD)


def test_what_the_cross_cut_aggregation_does_not_do_is_refused():
    with pytest.raises(ConfigError, match="robust.rule"):
        simulate(tiny_model("llama"), sites(), settings(robust={"rule": "norm-clip"}), PAD)

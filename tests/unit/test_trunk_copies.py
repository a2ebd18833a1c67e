"""SplitFed-V1 (split.server 'per-site'): a trunk copy per site, averaged by tokens. Checked
against the rule computed by hand with an independent trunk per site."""

import copy

import pytest
import torch

from fsl_edge.aggregation import fedavg
from fsl_edge.config import (LearningSettings, LoraSettings, Policy, SelectionSettings,
                             ServerCopies, SplitSettings, TrainSettings)
from fsl_edge.planner_settings import Pin, PlannerSettings
from fsl_edge.data import BatchStream, Sample, tokenize
from fsl_edge.errors import ConfigError
from fsl_edge.robust import aggregate_round
from fsl_edge.simulation import SiteData, simulate, site_seed
from fsl_edge.split import discover
from fsl_edge.step import ServerPart, SitePart, party_options, split_step
from fsl_edge.tiny import tiny_model, tiny_tokenizer
from fsl_edge.trunk_copies import TrunkCopies, average, check_per_site


def settings(server=ServerCopies.PER_SITE, rounds=2, steps=2, **kw) -> LearningSettings:
    return LearningSettings(split=SplitSettings(server=server), lora=LoraSettings(rank=4),
                            train=TrainSettings(rounds=rounds, steps=steps, batch_size=2,
                                                max_len=16, lr=1e-2), **kw)


PAD = 0


def sites(n=3):
    tok = tiny_tokenizer()
    return [SiteData(f"s{i}", tokenize([Sample("", f"site {i} note {j}: " + "x" * (j % 5))
                                         for j in range(8)], tok, max_len=32), [])
            for i in range(n)]


def test_per_site_simulation_equals_a_trunk_per_site_averaged_by_tokens_by_hand():
    model, pad = tiny_model("llama"), PAD
    data, s = sites(), settings(rounds=2, steps=2)
    got = simulate(model, data, s, pad)
    # by hand: the same initialisation as simulate, then per round each site trains its own
    # deep copy of the trunk (fresh optimizer), and the copies are averaged by tokens
    torch.manual_seed(s.train.seed)
    cut = s.split.cut(discover(model).n_blocks)
    server = ServerPart(copy.deepcopy(model), cut, s.lora, s.train.lr, **party_options(s))
    parts = [SitePart(copy.deepcopy(model), cut, s.lora, s.train.lr, **party_options(s)) for _ in data]
    site_adapter = parts[0].adapter()
    streams = [BatchStream(d.train, s.train.batch_size, site_seed(s.train.seed, d.name), pad) for d in data]
    for _ in range(s.train.rounds):
        for p in parts:
            p.load_adapter(site_adapter)
        trunks = [ServerPart(copy.deepcopy(model), cut, s.lora, s.train.lr, **party_options(s))
                  for _ in data]
        for t in trunks:
            t.load_adapter(server.adapter())
        tokens = [0] * len(data)
        for _ in range(s.train.steps):
            for i in range(len(data)):
                tokens[i] += split_step(parts[i], trunks[i], next(streams[i]), key=i).tokens
        server.load_adapter(fedavg([t.adapter() for t in trunks], tokens))
        # the sites' FedAvg as the simulation does it: of their deltas (lossless here)
        deltas = [{k: p.adapter()[k] - site_adapter[k] + 0 for k in site_adapter} for p in parts]
        site_adapter, _ = aggregate_round(site_adapter, deltas, tokens, s.robust, 1.0)
    for k, v in server.adapter().items():
        assert torch.equal(got.server_adapter[k], v), k
    for k, v in site_adapter.items():
        assert torch.equal(got.site_adapter[k], v), k


def test_per_site_differs_from_one_shared_trunk():
    model, data = tiny_model("llama"), sites()
    shared = simulate(model, data, settings(ServerCopies.SHARED), PAD).server_adapter
    per_site = simulate(model, data, settings(), PAD).server_adapter
    assert any(not torch.equal(shared[k], per_site[k]) for k in shared)


def fresh(model, s: LearningSettings, data):
    """The same trunk, sites, batch order and copies each time it is called."""
    cut = s.split.cut(discover(model).n_blocks)
    torch.manual_seed(0)
    server = ServerPart(copy.deepcopy(model), cut, s.lora, s.train.lr, **party_options(s))
    parts = [SitePart(copy.deepcopy(model), cut, s.lora, s.train.lr, **party_options(s)) for _ in data]
    streams = [BatchStream(d.train, 2, 7, PAD) for d in data]
    copies = TrunkCopies(server)
    copies.begin_round(server.adapter())
    return server, parts, streams, copies


def test_switching_copies_in_any_order_gives_each_site_the_same_copy():
    model, s = tiny_model("llama"), settings()
    data = sites(2)

    def run(order):
        server, parts, streams, copies = fresh(model, s, data)
        for i in order:
            copies.use(data[i].name)
            split_step(parts[i], server, next(streams[i]), key=i)
        return {d.name: copies.state(d.name) for d in data}

    a, b = run([0, 1, 0, 1]), run([1, 1, 0, 0])
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])


def test_average_weights_by_tokens_in_name_order():
    copies = {"b": {"x": torch.tensor([3.0])}, "a": {"x": torch.tensor([0.0])}}
    assert average(copies, {"a": 1, "b": 2})["x"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("extra, words", [
    ({"selection": SelectionSettings(policy=Policy.RANDOM)}, "selection.policy"),
    ({"planner": PlannerSettings(pins={"s0": Pin(front=1)})}, "one cut for every site"),
])
def test_per_site_refuses_what_it_does_not_do(extra, words):
    with pytest.raises(ConfigError, match=words):
        check_per_site(settings(**extra))


def test_a_step_in_flight_keeps_its_copy_while_another_sites_step_runs():
    # what a worker does while a u-shape step waits for its gradient: equal to one at a time
    model, s = tiny_model("llama"), settings()
    data = sites(2)

    def run(interleaved: bool):
        server, parts, streams, copies = fresh(model, s, data)
        for step in range(2):
            batches = [next(st) for st in streams]
            order = [(0, 1), (1, 1), (0, 2), (1, 2)] if interleaved else \
                [(0, 1), (0, 2), (1, 1), (1, 2)]  # (site, 1: forward / 2: backward)
            outs = {}
            for i, phase in order:
                copies.use(data[i].name)
                if phase == 1:
                    outs[i] = server.forward((step, i), parts[i].forward_front(batches[i]), site=str(i))
                else:
                    grad, _ = parts[i].forward_back(outs[i])
                    down = server.backward((step, i), grad)
                    server.step()
                    parts[i].backward_front(down)
                    parts[i].step()
        return {d.name: copies.state(d.name) for d in data}

    a, b = run(False), run(True)
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])

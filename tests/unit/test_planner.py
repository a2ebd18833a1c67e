"""The delay model and the planner on hand-made profiles: the trades it makes, memory and pins
respected, and its exact search equal to a brute force over every plan on small fleets."""

import itertools
import json
import random

import pytest

from fsl_edge.config import SplitMode
from fsl_edge.delay import (Candidate, CodecOption, ModelSpec, Workload, compute_s, estimate, hops,
                            makespan, message_bytes, scheduled_s, site_memory)
from fsl_edge.errors import ConfigError
from fsl_edge.planner import Pin, Plan, PlannerSettings, candidates, plan
from fsl_edge.profile import NodeProfile

MBIT = 1e6 / 8  # bytes/s
GIB = 1 << 30
# SmolLM2-135M as ModelSpec.from_model reads it (LoRA on q, k, v, o: 576+576, 576+192 x 2, 576+576)
SMOLLM2 = ModelSpec(n_blocks=30, hidden=576, intermediate=1536, vocab=49152, block_params=3_540_096,
                    embed_params=28_311_552, head_params=0, lora_unit=3840)
WORK = Workload(batch=8, seq=512, steps=20)
LOSSLESS = CodecOption(name="lossless", ratio=1.1, bytes_per_s=1.5e9)
BALANCED = CodecOption(name="balanced", ratio=6.0, bytes_per_s=3e8, adapter_ratio=4.0)


def node(block_s: float, mbit: float = 1000, rtt_ms: float = 1, mem_gib: float = 64,
         head_s: float | None = None) -> NodeProfile:
    """A profile measured at the workload's batch (8 x 512)."""
    return NodeProfile(device_kind="cuda", device_name="test", memory_bytes=int(mem_gib * GIB),
                       block_s=block_s, head_s=head_s if head_s is not None else 4 * block_s,
                       ref_batch=8, ref_seq=512, up_bytes_per_s=mbit * MBIT,
                       down_bytes_per_s=mbit * MBIT, rtt_s=rtt_ms / 1000)


SERVER = node(0.0015, mbit=10_000)


# --- the delay model -----------------------------------------------------------------------

def test_u_shape_sends_four_messages_a_step_and_vanilla_two():
    free = CodecOption(name="raw")
    link = node(0.01, mbit=100, rtt_ms=0)
    msg = 8 * 512 * 576 * 4  # (B, T, C) in fp32
    assert message_bytes(SMOLLM2, WORK, free) == msg
    assert hops(SplitMode.U_SHAPE) == (2, 2) and hops(SplitMode.VANILLA) == (1, 1)
    u = estimate(SMOLLM2, WORK, link, SERVER, Candidate(2, 29, 8, "raw"), free)
    vanilla = WORK.model_copy(update={"mode": SplitMode.VANILLA})
    v = estimate(SMOLLM2, vanilla, link, SERVER, Candidate(2, 30, 8, "raw"), free)
    assert u.wire_s == pytest.approx(4 * msg / (100 * MBIT))
    assert v.wire_s == pytest.approx(u.wire_s / 2)


def test_a_u_shape_cut_moves_compute_and_adapter_bytes_but_not_the_step_messages():
    link = node(0.01, mbit=20, rtt_ms=50)
    shallow = estimate(SMOLLM2, WORK, link, SERVER, Candidate(1, 29, 8, "lossless"), LOSSLESS)
    deep = estimate(SMOLLM2, WORK, link, SERVER, Candidate(6, 25, 8, "lossless"), LOSSLESS)
    assert deep.wire_s == shallow.wire_s  # the hidden size is the same at every cut
    assert deep.sync_s > shallow.sync_s  # 10 site blocks of LoRA to exchange instead of 2
    assert deep.site_s > shallow.site_s and deep.server_s < shallow.server_s
    assert deep.memory_bytes > shallow.memory_bytes


def test_a_u_shape_turn_holds_the_trunk_through_the_sites_tail_and_two_hops():
    # The shared trunk waits for the gradient of its output before serving anyone else
    # (coordinator/split_server.py), so the site's back blocks, head and the activation down and
    # gradient up are the server's time too; vanilla's server replies with the gradient at once.
    free = CodecOption(name="raw")
    link = node(0.01, mbit=100, rtt_ms=20)
    u = estimate(SMOLLM2, WORK, link, SERVER, Candidate(2, 27, 8, "raw"), free)
    tail = compute_s(link, SMOLLM2, WORK, 3, 8, head=True)  # blocks 27..29 and the head
    hop = 8 * 512 * 576 * 4 / (100 * MBIT) + 0.010
    assert u.hold_s == pytest.approx(u.server_s + tail + 2 * hop)
    assert u.busy_s == pytest.approx(WORK.steps * u.hold_s)
    vanilla = WORK.model_copy(update={"mode": SplitMode.VANILLA})
    v = estimate(SMOLLM2, vanilla, link, SERVER, Candidate(2, 30, 8, "raw"), free)
    assert v.hold_s == v.server_s and v.busy_s == pytest.approx(WORK.steps * v.server_s)


def test_the_makespan_is_the_steady_state_of_the_split_servers_order():
    rng = random.Random(1)
    for trial in range(20):
        work = Workload(batch=8, seq=512, steps=rng.choice([1, 5, 50]))
        ests = [estimate(SMOLLM2, work, node(rng.uniform(0.001, 0.05), mbit=rng.choice([20, 100, 1000]),
                                            rtt_ms=rng.uniform(1, 50)), SERVER,
                         Candidate(rng.randint(1, 10), 30 - rng.randint(1, 5), 8, "lossless"), LOSSLESS)
                for _ in range(rng.randint(1, 8))]
        model, replayed = makespan(ests), scheduled_s(ests, work.steps)
        # the order replayed: never faster than the model, slower by at most its ramp-up
        assert model * (1 - 1e-12) <= replayed <= model + max(e.step_s - e.hold_s for e in ests) \
            + max(e.sync_s for e in ests), trial
    # eight nodes on 20 Mbit/s: the trunk's compute alone (the old model) is a fraction of a
    # round, but their tails and hops in turn make the round the server's
    ests = [estimate(SMOLLM2, WORK, node(0.01, mbit=20), SERVER, Candidate(2, 29, 8, "raw"),
                     CodecOption(name="raw"))] * 8
    assert WORK.steps * sum(e.server_s for e in ests) < 0.1 * max(e.round_s for e in ests)
    assert makespan(ests) == pytest.approx(sum(e.busy_s for e in ests))
    assert makespan(ests) > 3 * ests[0].round_s
    assert scheduled_s(ests, WORK.steps) == pytest.approx(makespan(ests), rel=0.05)


def test_memory_is_weights_embeddings_lora_with_adam_and_activations():
    spec = ModelSpec(n_blocks=4, hidden=2, intermediate=3, vocab=5, block_params=100,
                     embed_params=10, head_params=7, lora_unit=4)
    work = Workload(batch=1, seq=2, steps=1)
    # site blocks 0 and 3 (a=1, b=3): weights (2*100 + 10 + 7) * 4, LoRA 2 * 2 * 4 params * 16,
    # activations 2 tokens * 2 blocks * (10*2 + 4*3) * 4, logits 2 tokens * 2 * 5 * 4
    expected = 217 * 4 + 16 * 16 + 2 * 2 * 32 * 4 + 2 * 2 * 5 * 4
    assert site_memory(spec, work, a=1, b=3, rank=2) == expected


def test_lora_parameters_per_block_match_peft():
    from fsl_edge.config import LoraSettings
    from fsl_edge.lora import attach
    from fsl_edge.tiny import tiny_model

    for family in ("llama", "gpt2"):
        spec = ModelSpec.from_model(tiny_model(family))
        wrapped = attach(tiny_model(family), [1, 4], LoraSettings(rank=4))
        lora = sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)
        assert lora == 2 * 4 * spec.lora_unit, family


# --- the planner's trades ------------------------------------------------------------------

SETTINGS = PlannerSettings(fronts=tuple(range(1, 9)), backs=tuple(range(1, 9)), ranks=(4, 8, 16),
                           codecs=(LOSSLESS,))


def site_blocks(p) -> int:
    return p.a + SMOLLM2.n_blocks - p.b


def test_a_fast_node_gets_a_deeper_cut_and_a_higher_rank_than_a_slow_one():
    # slow enough that its own round, not the trunk the two hold in turn, sets the makespan;
    # the hospital's rank 16 holds the trunk a little longer (its back block), within the room
    fleet = {"hospital": node(0.002), "clinic": node(0.06)}
    out = plan(SMOLLM2, WORK, fleet, SERVER, SETTINGS)
    fast, slow = out.nodes["hospital"], out.nodes["clinic"]
    assert site_blocks(fast) > site_blocks(slow) and fast.a > slow.a
    assert fast.rank > slow.rank
    assert out.bottleneck == "clinic" and out.makespan_s == pytest.approx(slow.round_s)
    # with 20 % slack the clinic may spend some on rank, never past the slack
    loose = plan(SMOLLM2, WORK, fleet, SERVER, SETTINGS.model_copy(update={"slack": 0.2}))
    assert loose.makespan_s <= 1.2 * out.makespan_s * (1 + 1e-12)
    assert loose.nodes["clinic"].rank > slow.rank


def test_where_the_shared_server_binds_the_fast_nodes_take_the_trunk_off_it():
    # vanilla: a turn is the server's compute; eight hospitals and a clinic on a server as fast
    # as a hospital. One cut for all must stay shallow for the clinic and leaves the hospitals'
    # blocks on the server; the planner gives them the deepest cut (every front is a candidate).
    vanilla = WORK.model_copy(update={"mode": SplitMode.VANILLA})
    settings = PlannerSettings(ranks=(4, 8), codecs=(LOSSLESS,))
    server = node(0.002, mbit=10_000)
    fleet = {f"h{i}": node(0.002) for i in range(8)} | {"clinic": node(0.05)}
    out = plan(SMOLLM2, vanilla, fleet, server, settings)
    fixed = min(makespan([estimate(SMOLLM2, vanilla, p, server, c, LOSSLESS) for p in fleet.values()])
                for c in candidates(SMOLLM2, vanilla, settings))
    assert fixed > 1.5 * out.makespan_s
    assert all(out.nodes[f"h{i}"].a == SMOLLM2.n_blocks - 2 for i in range(8))
    assert out.nodes["clinic"].a == 1 and out.bottleneck == "clinic"


def test_a_slow_link_gets_smaller_messages_where_compressing_pays():
    settings = SETTINGS.model_copy(update={"codecs": (LOSSLESS, BALANCED)})
    fast_link, slow_link = node(0.005, mbit=10_000, rtt_ms=1), node(0.005, mbit=20, rtt_ms=50)
    # alone, each node gets the codec that is faster for it: on 10 Gbit/s int4's coding time
    # costs more than the bytes it saves; on 20 Mbit/s it saves seconds a step
    assert plan(SMOLLM2, WORK, {"h": fast_link}, SERVER, settings).nodes["h"].codec == "lossless"
    assert plan(SMOLLM2, WORK, {"c": slow_link}, SERVER, settings).nodes["c"].codec == "balanced"
    out = plan(SMOLLM2, WORK, {"h": fast_link, "c": slow_link}, SERVER, settings)
    h, c = out.nodes["h"], out.nodes["c"]
    codecs = {x.name: x for x in settings.codecs}
    assert message_bytes(SMOLLM2, WORK, codecs[c.codec]) < message_bytes(SMOLLM2, WORK, codecs[h.codec])
    assert c.rank <= h.rank  # the clinic's adapter is no bigger to exchange either
    assert out.bottleneck == "c"


def test_candidates_that_exceed_memory_are_never_chosen():
    roomy = plan(SMOLLM2, WORK, {"n": node(0.001, mem_gib=64)}, SERVER, SETTINGS).nodes["n"]
    limit = 3.0  # GiB: about 6 site blocks' activations at 8 x 512 tokens, with the logits
    tight = plan(SMOLLM2, WORK, {"n": node(0.001, mem_gib=limit)}, SERVER, SETTINGS).nodes["n"]
    assert tight.memory_bytes <= 0.9 * limit * GIB < roomy.memory_bytes
    assert site_blocks(tight) < site_blocks(roomy)
    with pytest.raises(ConfigError, match="smallest candidate needs"):
        plan(SMOLLM2, WORK, {"n": node(0.001, mem_gib=0.5)}, SERVER, SETTINGS)


def test_pinned_choices_are_respected():
    pins = {"hospital": Pin(front=2, back=3, rank=4)}
    settings = SETTINGS.model_copy(update={"pins": pins})
    out = plan(SMOLLM2, WORK, {"hospital": node(0.002), "clinic": node(0.03)}, SERVER, settings)
    h = out.nodes["hospital"]
    assert (h.a, h.b, h.rank, h.pinned) == (2, 27, 4, True)
    assert not out.nodes["clinic"].pinned
    with pytest.raises(ConfigError, match="unknown nodes"):
        plan(SMOLLM2, WORK, {"clinic": node(0.03)}, SERVER, settings)
    bad = SETTINGS.model_copy(update={"pins": {"clinic": Pin(codec="zip")}})
    with pytest.raises(ConfigError, match="codec 'zip'"):
        plan(SMOLLM2, WORK, {"clinic": node(0.03)}, SERVER, bad)


def test_the_plan_is_json_for_status():
    out = plan(SMOLLM2, WORK, {"hospital": node(0.002), "clinic": node(0.03)}, SERVER, SETTINGS)
    text = json.dumps(out.model_dump(mode="json"))
    assert Plan.model_validate_json(text) == out


# --- the search is exact -------------------------------------------------------------------

def brute_force(spec, work, fleet, server, settings) -> float:
    """The least makespan over every combination of every node's fitting candidates."""
    codecs = {c.name: c for c in settings.codecs}
    options = []
    for node_id, profile in fleet.items():
        ests = [estimate(spec, work, profile, server, c, codecs[c.codec])
                for c in candidates(spec, work, settings, settings.pins.get(node_id))]
        options.append([e for e in ests if e.memory_bytes <= profile.memory_bytes * settings.memory_fraction])
    return min(makespan(list(combo), work.server_workers) for combo in itertools.product(*options))


@pytest.mark.parametrize("mode", [SplitMode.U_SHAPE, SplitMode.VANILLA])
def test_the_search_finds_the_brute_force_optimum(mode):
    spec = SMOLLM2.model_copy(update={"n_blocks": 6})
    settings = PlannerSettings(fronts=(1, 2, 3), backs=(1, 2), ranks=(2, 4), codecs=(LOSSLESS, BALANCED))
    rng = random.Random(0)
    coupled = 0  # cases where each node's own fastest choice overloads the shared server
    for trial in range(12):
        work = Workload(mode=mode, batch=8, seq=512, steps=rng.choice([1, 5, 20]),
                        server_workers=rng.choice([1, 2]))
        fleet = {}
        for i in range(3):
            block_s = rng.uniform(0.005, 0.05)
            fleet[f"n{i}"] = node(block_s, head_s=block_s, mbit=rng.choice([1000, 10_000, 10_000]),
                                  rtt_ms=rng.uniform(0.1, 5), mem_gib=rng.uniform(2.4, 4))
        server = node(rng.uniform(0.005, 0.05))
        out = plan(spec, work, fleet, server, settings)
        best = brute_force(spec, work, fleet, server, settings)
        assert out.makespan_s == pytest.approx(best, rel=1e-12), trial
        codecs = {c.name: c for c in settings.codecs}
        greedy = [min((estimate(spec, work, p, server, c, codecs[c.codec])
                       for c in candidates(spec, work, settings)), key=lambda e: e.round_s
                      if e.memory_bytes <= 0.9 * p.memory_bytes else float("inf"))
                  for p in fleet.values()]
        coupled += makespan(greedy, work.server_workers) > best * (1 + 1e-9)
    assert coupled >= 2, "the cases never needed the search to look past each node's own best"

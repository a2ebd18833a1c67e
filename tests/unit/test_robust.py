"""Robust aggregation: poisoned updates are rejected or clipped, the trimmed mean matches values
computed by hand, repeat offenders are quarantined and released, and with no rule and honest
sites the result is plain FedAvg bit for bit."""

import json
import math

import pytest
import torch
from pydantic import ValidationError

from fsl_edge.aggregation import fedavg, server_step
from fsl_edge.compression import advance, aggregate
from fsl_edge.errors import ConfigError
from fsl_edge.robust import Quarantine, RobustMean, RobustRule, RobustSettings, norm, robust_mean, trimmed_mean


def delta(seed: int, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q.lora_A": (torch.randn(4, 32, generator=g) * scale).to(dtype),
            "q.lora_B": (torch.randn(32, 4, generator=g) * scale).to(dtype)}


def honest_round(n: int = 6, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    return [delta(i, dtype=dtype) for i in range(n)]


def distance(a, b) -> float:
    return norm({k: a[k].double() - b[k].double() for k in a})


def poisoned(kind: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if kind == "x100":
        return {k: v * 100 for k, v in base.items()}
    bad = {k: v.clone() for k, v in base.items()}
    bad["q.lora_B"][3, 1] = {"nan": math.nan, "inf": math.inf}[kind]
    return bad


# --- checks and rules ------------------------------------------------------------------------

@pytest.mark.parametrize("rule", list(RobustRule))
@pytest.mark.parametrize("kind", ["x100", "nan", "inf"])
def test_a_poisoned_update_is_rejected_and_the_mean_is_the_honest_one(rule, kind):
    honest = honest_round()
    weights = [100, 120, 80, 90, 110, 100]
    out = robust_mean([*honest, poisoned(kind, delta(99))], [*weights, 100],
                      RobustSettings(rule=rule, trim=0.0))
    assert [v.status for v in out.verdicts[:-1]] == ["accepted"] * 6
    # under norm-clip a too-large update is clipped, never a non-finite one
    expected = "clipped" if rule is RobustRule.NORM_CLIP and kind == "x100" else "rejected"
    assert out.verdicts[-1].status == expected
    assert out.verdicts[-1].reason
    if expected == "rejected":
        reference = fedavg(honest, weights)
        assert all(torch.equal(out.mean[k], reference[k]) for k in reference)


def test_norm_clip_bounds_the_influence_of_a_huge_update():
    honest = honest_round(8)
    settings = RobustSettings(rule="norm-clip", max_norm_ratio=2.0)
    out = robust_mean([*honest, poisoned("x100", delta(99))], [1] * 9, settings)
    bad = out.verdicts[-1]
    assert bad.status == "clipped" and bad.norm > 50 * out.median_norm
    assert out.bound == pytest.approx(2.0 * out.median_norm)
    # the clipped update has norm `bound`, 1/9 of the weight: it moves the mean by at most
    # (bound + |honest mean|) / 9, where unclipped it would move it by ~100 x median / 9
    honest_mean = fedavg(honest, [1] * 8)
    assert distance(out.mean, honest_mean) <= (out.bound + norm(honest_mean)) / 9 + 1e-6
    assert distance(out.mean, honest_mean) < 0.05 * distance(fedavg([*honest, poisoned("x100", delta(99))],
                                                                    [1] * 9), honest_mean)


def test_a_small_update_is_not_flagged_and_no_bound_means_no_norm_check():
    honest = honest_round()
    tiny = {k: v * 1e-3 for k, v in delta(7).items()}
    out = robust_mean([*honest, tiny], [1] * 7, RobustSettings())
    assert [v.status for v in out.verdicts] == ["accepted"] * 7  # only an upper bound
    big = poisoned("x100", delta(99))
    out = robust_mean([*honest, big], [1] * 7, RobustSettings(max_norm_ratio=None))
    assert out.verdicts[-1].status == "accepted" and out.bound == math.inf
    assert robust_mean([*honest, poisoned("nan", big)], [1] * 7,
                       RobustSettings(max_norm_ratio=None)).verdicts[-1].status == "rejected"


def test_two_updates_cannot_outvote_each_other():
    # the median of two norms is their mean: neither can exceed 2 x median
    out = robust_mean([delta(0), poisoned("x100", delta(1))], [1, 1], RobustSettings(max_norm_ratio=2.0))
    assert out.verdicts[0].status == "accepted" and out.verdicts[1].status == "accepted"


def test_when_everything_is_rejected_there_is_no_mean():
    out = robust_mean([poisoned("nan", delta(0)), poisoned("inf", delta(1))], [1, 1], RobustSettings())
    assert out.mean is None and all(v.status == "rejected" for v in out.verdicts)
    # a zero-weight site alone cannot carry the round either
    out = robust_mean([delta(0), poisoned("nan", delta(1))], [0, 5], RobustSettings())
    assert out.mean is None and out.verdicts[0].status == "accepted"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 1], [120, 40, 40, 7, 300], [0.1, 0.2, 0.3, 0, 1e9]])
@pytest.mark.parametrize("lr", [1.0, 2.5])
def test_rule_none_with_honest_sites_is_plain_fedavg_bit_for_bit(dtype, weights, lr):
    deltas, global_ = honest_round(5, dtype), delta(42, dtype=dtype)
    out = robust_mean(deltas, weights, RobustSettings())
    assert all(not v.flagged for v in out.verdicts)
    plain = aggregate(global_, deltas, weights, fedavg, server_step, lr)
    robust = advance(global_, out.mean, server_step, lr)
    for k in plain:
        assert robust[k].dtype == dtype
        assert torch.equal(robust[k], plain[k]), k


def test_trimmed_mean_matches_hand_computed_values():
    x = [torch.tensor([1.0, 50.0, -3.0]), torch.tensor([2.0, 0.0, -1.0]), torch.tensor([3.0, 4.0, -2.0]),
         torch.tensor([4.0, 6.0, 100.0]), torch.tensor([-90.0, 5.0, -4.0])]
    states = [{"v": t} for t in x]
    w = [1, 1, 2, 1, 3]
    # trim 0.2 of 5 drops 1 value at each end of every coordinate:
    #   coord 0: sorted -90(w3) 1(w1) 2(w1) 3(w2) 4(w1) -> keep 1, 2, 3 with w 1, 1, 2: (1 + 2 + 6) / 4 = 2.25
    #   coord 1: sorted 0(w1) 4(w2) 5(w3) 6(w1) 50(w1)  -> keep 4, 5, 6 with w 2, 3, 1: (8 + 15 + 6) / 6 = 29 / 6
    #   coord 2: sorted -4(w3) -3(w1) -2(w2) -1(w1) 100(w1) -> keep -3, -2, -1 w 1, 2, 1: -8 / 4 = -2
    out = trimmed_mean(states, w, 0.2)["v"]
    assert torch.allclose(out, torch.tensor([2.25, 29 / 6, -2.0]), atol=0, rtol=1e-7)
    # unweighted: the plain mean of the middle three
    assert torch.allclose(trimmed_mean(states, [1] * 5, 0.2)["v"], torch.tensor([2.0, 5.0, -2.0]))
    # trim 0.1 of 5 rounds down to 0: the weighted mean of everything, i.e. fedavg
    assert torch.allclose(trimmed_mean(states, w, 0.1)["v"], fedavg(states, w)["v"])
    # kept values whose sites all have weight 0 are averaged plainly
    assert torch.allclose(trimmed_mean(states, [0, 0, 0, 0, 1], 0.2)["v"], torch.tensor([2.0, 5.0, -2.0]))


def test_trimmed_mean_stays_within_the_honest_range_whatever_weight_an_attacker_claims():
    honest = honest_round(8)
    attackers = [{k: torch.full_like(v, 1e3) for k, v in delta(0).items()},
                 {k: torch.full_like(v, -1e3) for k, v in delta(0).items()}]
    out = robust_mean([*honest, *attackers], [1] * 8 + [1e9, 1e9],
                      RobustSettings(rule="trimmed-mean", trim=0.2, max_norm_ratio=None))
    for k in out.mean:
        stacked = torch.stack([h[k] for h in honest])
        assert (out.mean[k] >= stacked.min(0).values).all() and (out.mean[k] <= stacked.max(0).values).all()


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError, match="one weight per delta"):
        robust_mean([delta(0)], [1, 2], RobustSettings())
    with pytest.raises(ConfigError, match="positive sum"):
        robust_mean([delta(0)], [0], RobustSettings())
    with pytest.raises(ConfigError, match="different keys"):
        robust_mean([delta(0), {"q.lora_A": delta(1)["q.lora_A"]}], [1, 1], RobustSettings())
    with pytest.raises(ConfigError, match="has shape"):
        robust_mean([delta(0), {**delta(1), "q.lora_B": torch.zeros(4, 4)}], [1, 1], RobustSettings())


def test_settings_are_validated():
    assert RobustSettings().rule is RobustRule.NONE
    assert RobustSettings(rule="trimmed-mean").rule is RobustRule.TRIMMED_MEAN
    for bad in ({"rule": "median"}, {"trim": 0.5}, {"max_norm_ratio": 0.5}, {"quarantine_after": -1},
                {"quarantine_rounds": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            RobustSettings(**bad)


# --- quarantine ------------------------------------------------------------------------------

def test_a_node_rejected_k_times_in_a_row_is_quarantined_for_n_rounds():
    q = Quarantine.from_settings(RobustSettings(quarantine_after=3, quarantine_rounds=2))
    assert q.record(1, {"a": True, "b": False}) == []
    assert q.record(2, {"a": True, "b": True}) == []
    assert q.record(3, {"a": True, "b": False}) == ["a"]
    assert q.excluded(4) == q.excluded(5) == {"a"}
    assert q.release(5) == [] and q.release(6) == ["a"]
    assert q.excluded(6) == set()
    # released with a clean slate: it takes three strikes again
    assert q.record(6, {"a": True}) == [] and q.record(7, {"a": True}) == []
    assert q.record(8, {"a": True}) == ["a"]


def test_an_accepted_update_resets_the_count():
    q = Quarantine(after=2)
    for r, bad in enumerate([True, False, True, False, True], 1):
        assert q.record(r, {"a": bad}) == []
    assert q.record(6, {"a": True}) == ["a"]


def test_a_quarantine_without_a_term_lasts_until_lifted():
    q = Quarantine(after=1, rounds=None)
    assert q.record(1, {"a": True}) == ["a"]
    assert q.release(1000) == [] and q.excluded(1000) == {"a"}
    q.record(2, {"a": True})  # a quarantined node's updates (should there be any) change nothing
    assert q.lift("a") and not q.lift("a")
    assert q.excluded(3) == set()


def test_quarantine_after_zero_never_quarantines():
    q = Quarantine(after=0)
    for r in range(1, 20):
        assert q.record(r, {"a": True}) == []
    assert q.excluded(20) == set()


def test_quarantine_state_round_trips_through_json():
    q = Quarantine(after=2, rounds=5)
    q.record(1, {"a": True, "b": True, "c": False})
    q.record(2, {"a": True})
    restored = Quarantine(after=2, rounds=5)
    restored.load_state_dict(json.loads(json.dumps(q.state_dict())))
    assert restored.state_dict() == q.state_dict()
    assert restored.excluded(3) == {"a"}
    assert restored.record(3, {"b": True}) == ["b"]  # b's strike survived the checkpoint
    with pytest.raises(ConfigError, match="not a quarantine state"):
        restored.load_state_dict({"strikes": []})


def test_verdicts_drive_the_quarantine():
    q, settings = Quarantine(after=2), RobustSettings()
    for r in (1, 2):
        names = ["a", "b", "c", "mallory"]
        out: RobustMean = robust_mean([*honest_round(3), poisoned("x100", delta(9))], [1] * 4, settings)
        newly = q.record(r, {n: v.flagged for n, v in zip(names, out.verdicts)})
    assert newly == ["mallory"] and q.excluded(3) == {"mallory"}

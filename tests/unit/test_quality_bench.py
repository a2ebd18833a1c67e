"""The quality protocol's pure parts: mean ± std over seeds, goals, the 1B/8B projection.

Nothing here imports Flower (the bench extra is not installed in CI)."""

import pytest

from bench.projection import (LLAMA_3_1_8B, LLAMA_3_2_1B, Sizes, Split, llama_sizes, project)
from bench.quality_report import RowSummary, cost_goals, fmt, gap, loss_goals, mean_std, table


def test_mean_and_sample_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([2.5]) == (2.5, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_formatting_mean_std():
    assert fmt([1.0, 2.0, 3.0]) == "2.0000 ± 1.0000"
    assert fmt([2.5]) == "2.5000"
    assert fmt([]) == "—"
    assert fmt([0.25, 0.75], digits=1, scale=100) == "50.0 ± 35.4"


def test_gap_is_percent_of_the_reference():
    assert gap(2.04, 2.0) == pytest.approx(2.0)
    assert gap(1.9, 2.0) == pytest.approx(-5.0)


def test_published_parameter_counts_from_the_configs():
    smollm2 = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
               "tie_word_embeddings": True}
    assert llama_sizes(smollm2).params == 134_515_008
    assert llama_sizes(LLAMA_3_2_1B).params == 1_235_814_400
    assert llama_sizes(LLAMA_3_1_8B).params == 8_030_261_248


def test_projection_against_a_hand_computation():
    ref = Sizes("ref", n_blocks=10, hidden=10, intermediate=20, vocab=100, block_params=100,
                embed_head_params=1000)  # 180 activations per token
    target = Sizes("big", n_blocks=20, hidden=20, intermediate=40, vocab=300, block_params=400,
                   embed_head_params=12000)  # 360 activations per token
    # measured: 1 s and 1000 B per block (400 B of weights), 3 s and 5000 B fixed (4000 B weights)
    seconds, memory = Split(whole=13.0, site=5.0), Split(whole=15000.0, site=7000.0)
    p = project(ref, seconds, memory, site_blocks=2, target=target, target_site_blocks=3)
    # compute: 1 s x 400/100 per block; 3 s x (300 x 20)/(100 x 10) fixed
    assert (p.site_s, p.whole_s) == pytest.approx((3 * 4 + 18, 20 * 4 + 18))
    # memory per block 400 x 4 + 600 x 360/180; fixed 12000 x 4 + 1000 x 300/100
    assert (p.site_bytes, p.whole_bytes) == pytest.approx((3 * 2800 + 51000, 20 * 2800 + 51000))
    assert p.compute_ratio == pytest.approx(30 / 98)


def test_projection_refuses_measurements_it_cannot_separate():
    with pytest.raises(ValueError, match="too noisy"):
        Split(whole=1.0, site=1.2).per_block_and_fixed(10, 2)
    with pytest.raises(ValueError, match="too noisy"):
        Split(whole=10.0, site=1.0).per_block_and_fixed(10, 2)  # fixed part < 0


def _row(name, losses, cost=None):
    return RowSummary(name, {"a": losses}, losses, exact=[0.5] * len(losses),
                      seconds=[1.0] * len(losses), cost=cost)


def test_goal_lines_say_met_or_not():
    central, alone = _row("central", [2.0, 2.0]), [_row("a alone", [3.0, 3.0])]
    near, far = _row("fsl near", [2.03, 2.03]), _row("fsl far", [2.1, 2.1])
    lines = loss_goals(central, [near, far], alone)
    assert "+1.50 %** (goal within 2 %: met)" in lines[0]
    assert "+5.00 %** (goal within 2 %: NOT met)" in lines[1]
    flower = _row("flower", [2.02, 2.02], cost=(3.0, 1000))
    fsl = _row("fsl", [2.03, 2.03], cost=(0.9, 400))
    line = cost_goals(fsl, flower)[0]
    assert "**0.30x** of Flower's (goal <= 0.33: met)" in line
    assert "**0.40x** (goal <= 0.50: met)" in line


def test_table_has_one_line_per_row():
    lines = table([_row("r", [1.0, 3.0], cost=(0.5, 2 ** 21))], ["a"])
    assert lines[2] == ("| r | 2.0000 ± 1.4142 | **2.0000 ± 1.4142** | 50.0 ± 0.0 | 0.500 | 2 | — "
                        "| 1 ± 0 |")


def test_a_row_collects_seeds_and_bytes_by_kind():
    from bench.quality_report import bytes_by_kind

    r = RowSummary("fsl")
    for seed in range(2):
        r.add({"a": 2.0 + seed}, 2.0 + seed, None, 10.0,
              {"activation_up": 2 ** 20 * (1 + seed), "gradient_up": 0.0})
    assert r.overall == [2.0, 3.0] and r.exact == [] and r.per == {"a": [2.0, 3.0]}
    assert r.bytes_per_round == [2 ** 20, 2 ** 21]
    assert bytes_by_kind([r, RowSummary("central")]) == "fsl: activation up 1.50"

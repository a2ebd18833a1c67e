"""Aggregation across different cuts and LoRA ranks, against values computed by hand on small
explicit tensors."""

import pytest
import torch

from fsl_edge.aggregation import fedavg
from fsl_edge.errors import ConfigError
from fsl_edge.hetero import (aggregate, block_index, hand_back, pad_rank, refactor, scaling,
                             server_block_weights)

T = torch.tensor


def key(block: int, which: str, proj: str = "q_proj") -> str:
    return f"base_model.model.model.layers.{block}.self_attn.{proj}.lora_{which}.weight"


def module(block: int, A, B, proj: str = "q_proj") -> dict[str, torch.Tensor]:
    return {key(block, "A", proj): T(A, dtype=torch.float64), key(block, "B", proj): T(B, dtype=torch.float64)}


def product(state, block: int, alpha: float = 1.0) -> torch.Tensor:
    A, B = state[key(block, "A")], state[key(block, "B")]
    return scaling(A.shape[0], alpha) * B @ A  # (d_out, d_in)


def test_block_index_reads_the_block_from_peft_keys():
    assert block_index(key(12, "A")) == 12
    assert block_index("base_model.model.transformer.h.3.attn.c_attn.lora_B.weight", "h") == 3
    assert block_index("base_model.model.lm_head.weight") is None


def test_the_server_copy_stands_in_for_the_sites_whose_cut_put_a_block_on_it():
    # 4 blocks; site x cut (1, 3): server runs 1, 2; site y cut (2, 3): server runs 2
    assert server_block_weights({"x": (1, 3), "y": (2, 3)}, {"x": 10, "y": 30}) == {1: 10, 2: 40}


def test_per_layer_fedavg_over_every_party_that_trained_the_layer():
    # u-shape, 4 blocks, back = 1. x: a = 1, site blocks 0, 3, 10 tokens; y: a = 2, site
    # blocks 0, 1, 3, 30 tokens. The server trained block 1 for x and block 2 for both.
    x = {**module(0, [[1.0]], [[2.0]]), **module(3, [[4.0]], [[1.0]])}
    y = {**module(0, [[5.0]], [[6.0]]), **module(1, [[3.0]], [[3.0]]), **module(3, [[0.0]], [[1.0]])}
    server = {**module(1, [[7.0]], [[-1.0]]), **module(2, [[2.0]], [[8.0]])}
    weights = server_block_weights({"x": (1, 3), "y": (2, 3)}, {"x": 10, "y": 30})
    out = aggregate([(x, 10), (y, 30), (server, weights)])
    expected = {
        **module(0, [[(10 * 1 + 30 * 5) / 40]], [[(10 * 2 + 30 * 6) / 40]]),  # [[4.0]], [[5.0]]
        **module(1, [[(30 * 3 + 10 * 7) / 40]], [[(30 * 3 + 10 * -1) / 40]]),  # y's site and server (for x)
        **module(2, [[2.0]], [[8.0]]),  # only the server trained it
        **module(3, [[(10 * 4 + 30 * 0) / 40]], [[1.0]]),
    }
    assert out.keys() == expected.keys()
    for k in expected:
        assert torch.equal(out[k], expected[k]), k
    assert hand_back(out, x).keys() == x.keys() and hand_back(out, server).keys() == server.keys()


def test_padding_then_truncating_equal_ranks_is_plain_fedavg_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    states = []
    for _ in range(3):
        state = {}
        for b in (0, 1):
            state[key(b, "A")] = torch.randn(4, 8, generator=g)  # (r, d_in)
            state[key(b, "B")] = torch.randn(6, 4, generator=g)  # (d_out, r)
        states.append(state)
    weights = [120, 40, 40]
    out = aggregate(list(zip(states, weights)), method="pad", alpha=16.0)
    reference = fedavg(states, weights)
    for k in reference:
        assert torch.equal(out[k], reference[k]), k
        assert torch.equal(hand_back(out, states[0], alpha=16.0)[k], reference[k]), k


def test_zero_padding_different_ranks_keeps_each_update_and_averages_the_factors():
    # alpha = 2: s(1) = 2, s(2) = 1. Site 1 (rank 1, 1 token share), site 2 (rank 2, 3 shares).
    s1 = module(0, [[1.0, 2.0]], [[3.0], [4.0]])
    s2 = module(0, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]])
    A1, B1 = pad_rank(s1[key(0, "A")], s1[key(0, "B")], 2, lambda r: scaling(r, 2.0))
    assert torch.equal(A1, T([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(B1, T([[6.0, 0.0], [8.0, 0.0]], dtype=torch.float64))  # B * s(1) / s(2)
    assert torch.equal(1.0 * B1 @ A1, product(s1, 0, alpha=2.0))  # the update is unchanged
    out = aggregate([(s1, 1), (s2, 3)], method="pad", alpha=2.0)
    # A: (1 * A1 + 3 * I) / 4; B: (1 * B1 + 3 * B2) / 4
    assert torch.equal(out[key(0, "A")], T([[1.0, 0.5], [0.0, 0.75]], dtype=torch.float64))
    assert torch.equal(out[key(0, "B")], T([[2.25, 1.5], [4.25, 3.0]], dtype=torch.float64))
    # handed back at rank 1: the first component, with B rescaled by s(2) / s(1) = 1 / 2
    back = hand_back(out, s1, alpha=2.0)
    assert torch.equal(back[key(0, "A")], T([[1.0, 0.5]], dtype=torch.float64))
    assert torch.equal(back[key(0, "B")], T([[1.125], [2.125]], dtype=torch.float64))


def test_the_svd_route_reproduces_the_weighted_mean_of_the_products_exactly():
    g = torch.Generator().manual_seed(1)
    ranks, weights, alpha = (1, 2, 3), (5, 1, 2), 16.0
    states = [{key(0, "A"): torch.randn(r, 7, generator=g, dtype=torch.float64),
               key(0, "B"): torch.randn(9, r, generator=g, dtype=torch.float64)} for r in ranks]
    mean = sum(w * product(s, 0, alpha) for s, w in zip(states, weights)) / sum(weights)
    out = aggregate(list(zip(states, weights)), method="svd", alpha=alpha, rank=6)  # 6 = 1 + 2 + 3
    assert out[key(0, "A")].shape == (6, 7) and out[key(0, "B")].shape == (9, 6)
    assert torch.allclose(product(out, 0, alpha), mean, atol=1e-12, rtol=0)
    # zero-padding the same set averages A and B apart: not the mean of the products
    padded = aggregate(list(zip(states, weights)), method="pad", alpha=alpha)
    assert not torch.allclose(product(padded, 0, alpha), mean, atol=1e-3)


def test_svd_by_hand_and_best_approximation_below_the_needed_rank():
    # two rank-1 updates along different axes: the mean is diag(3, 1) (weights 3 and 1)
    x = module(0, [[1.0, 0.0]], [[4.0], [0.0]])  # 4 e1 e1^T
    y = module(0, [[0.0, 2.0]], [[0.0], [2.0]])  # 4 e2 e2^T
    out = aggregate([(x, 3), (y, 1)], method="svd", rank=2)
    assert torch.allclose(product(out, 0), T([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    # at rank 1, the best approximation keeps the larger direction (Eckart-Young)
    one = aggregate([(x, 3), (y, 1)], method="svd", rank=1)
    assert torch.allclose(product(one, 0), T([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    # handing the rank-2 result back to a rank-1 site gives that same best approximation
    assert torch.allclose(product(hand_back(out, x), 0), product(one, 0))
    # sqrt of the singular values on each side
    A, B = refactor(T([[9.0, 0.0], [0.0, 0.0]], dtype=torch.float64), 1, lambda r: 1.0)
    assert torch.allclose(A.abs(), T([[3.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(B.abs(), T([[3.0], [0.0]], dtype=torch.float64))


def test_a_key_nobody_trained_this_round_is_kept():
    idle = module(5, [[1.5]], [[2.5]])
    out = aggregate([(idle, {4: 10.0})])  # the server copy holds block 5 but no site used it
    assert torch.equal(out[key(5, "A")], idle[key(5, "A")])


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ConfigError, match="not its pair"):
        aggregate([({key(0, "A"): torch.ones(1, 2)}, 1)])
    with pytest.raises(ConfigError, match="'pad' or 'svd'"):
        aggregate([(module(0, [[1.0]], [[1.0]]), 1)], method="mean")
    with pytest.raises(ConfigError, match="lacks"):
        hand_back(module(0, [[1.0]], [[1.0]]), module(1, [[1.0]], [[1.0]]))

"""Aggregation as pure functions: FedAvg and SplitFed-V1's server-copy average, checked against
values computed by hand on small explicit tensors."""

import pytest
import torch

from fsl_edge.aggregation import average_server_copies, fedavg
from fsl_edge.errors import ConfigError


def adapter(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.q_proj.lora_A.weight": torch.randn(4, 32, generator=g).to(dtype),
        "blocks.0.q_proj.lora_B.weight": torch.randn(32, 4, generator=g).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 3, 7], [0.1, 0.2, 0.3], [1e9, 1, 3]])
def test_fedavg_of_identical_adapters_is_a_bit_exact_no_op(dtype, weights):
    state = adapter(0, dtype)
    out = fedavg([state, {k: v.clone() for k, v in state.items()}, state], weights)
    assert set(out) == set(state)
    for k, v in state.items():
        assert out[k].dtype == dtype
        assert torch.equal(out[k], v), k


def test_weighted_average_matches_hand_computed_values():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, -8.0])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([4.0, 0.0])}
    out = fedavg([a, b], [1, 3])  # (1 * a + 3 * b) / 4
    assert torch.equal(out["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out["b"], torch.tensor([3.0, -2.0]))


def test_weights_are_token_counts_and_need_not_sum_to_one():
    states = [{"x": torch.tensor([2.0])}, {"x": torch.tensor([10.0])}, {"x": torch.tensor([-4.0])}]
    # (120 * 2 + 40 * 10 + 40 * -4) / 200 = (240 + 400 - 160) / 200 = 2.4
    assert fedavg(states, [120, 40, 40])["x"].item() == pytest.approx(2.4)
    # scaling every weight by the same factor changes nothing
    assert torch.equal(fedavg(states, [120, 40, 40])["x"], fedavg(states, [3, 1, 1])["x"])


def test_a_zero_weight_site_does_not_count():
    out = fedavg([{"x": torch.tensor([1.0, 1.0])}, {"x": torch.tensor([100.0, -100.0])}], [5, 0])
    assert torch.equal(out["x"], torch.tensor([1.0, 1.0]))


def test_fedavg_does_not_modify_its_inputs():
    a, b = adapter(1), adapter(2)
    before = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    fedavg([a, b], [2, 5])
    for s, copy in zip((a, b), before):
        for k in s:
            assert torch.equal(s[k], copy[k])


def test_single_state_is_returned_unchanged():
    state = adapter(3)
    out = fedavg([state], [17])
    for k, v in state.items():
        assert torch.equal(out[k], v)


@pytest.mark.parametrize("states, weights, match", [
    ([], [], "at least one state"),
    ([{"x": torch.zeros(2)}] * 2, [1], "2 states but 1 weights"),
    ([{"x": torch.zeros(2)}] * 2, [1, -1], r"weights must be >= 0.*\[1, -1\]"),
    ([{"x": torch.zeros(2)}] * 2, [0, 0], r"positive sum.*\[0, 0\]"),
    ([{"x": torch.zeros(2)}, {"y": torch.zeros(2)}], [1, 1],
     r"state 1 has different keys.*'x', 'y'"),
    ([{"x": torch.zeros(2), "y": torch.zeros(1)}, {"x": torch.zeros(2)}], [1, 1],
     r"state 1 has different keys.*'y'"),
    ([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}], [1, 1],
     r"state 1: x has shape \(3,\), expected \(2,\)"),
    ([{"x": torch.zeros(2, 4)}, {"x": torch.zeros(4, 2)}], [1, 1],
     r"state 1: x has shape \(4, 2\), expected \(2, 4\)"),
])
def test_fedavg_rejects_bad_input_naming_the_problem(states, weights, match):
    with pytest.raises(ConfigError, match=match):
        fedavg(states, weights)


def test_average_server_copies_is_the_plain_mean():
    copies = [adapter(s) for s in (4, 5, 6)]
    out = average_server_copies(copies)
    for k in copies[0]:
        expected = torch.stack([c[k] for c in copies]).mean(0)
        assert torch.allclose(out[k], expected, atol=1e-6), k
    by_hand = average_server_copies([{"x": torch.tensor([1.0, 0.0])},
                                     {"x": torch.tensor([2.0, 6.0])},
                                     {"x": torch.tensor([6.0, 3.0])}])
    assert torch.equal(by_hand["x"], torch.tensor([3.0, 3.0]))


def test_average_of_one_server_copy_is_that_copy():
    """SplitFed-V2 (one shared trunk) is the one-copy case of V1."""
    state = adapter(7)
    out = average_server_copies([state])
    for k, v in state.items():
        assert torch.equal(out[k], v)


def test_server_step_is_fedavg_at_lr_1_and_extrapolates_otherwise():
    from fsl_edge.aggregation import server_step

    prev = {"w": torch.tensor([1.0, 2.0])}
    avg = {"w": torch.tensor([2.0, 0.0])}
    assert server_step(prev, avg, 1.0) is avg
    assert torch.equal(server_step(prev, avg, 3.0)["w"], torch.tensor([4.0, -4.0]))
    assert torch.equal(server_step(prev, avg, 0.5)["w"], torch.tensor([1.5, 1.0]))

"""The pass cost model (models/pass_cost.py): interpolation, marginal cost, best node budget."""

import pytest

from ctc_drafter.models.pass_cost import PassCostModel


def test_interpolates_between_and_extrapolates_beyond_the_measured_sizes():
    c = PassCostModel({1: 40.0, 4: 52.0, 16: 64.0})
    assert c.pass_ms(1) == 40.0 and c.pass_ms(4) == 52.0 and c.pass_ms(16) == 64.0
    assert c.pass_ms(2) == pytest.approx(44.0) and c.pass_ms(10) == pytest.approx(58.0)
    assert c.pass_ms(28) == pytest.approx(76.0)  # the last segment's slope, 1 ms/node
    assert c.pass_ms(0.5) == 40.0
    assert c.marginal_ms(1) == pytest.approx(4.0) and c.marginal_ms(5) == pytest.approx(1.0)


def test_noise_never_makes_a_larger_pass_cheaper():
    c = PassCostModel({1: 40.0, 4: 55.0, 8: 50.0, 16: 70.0})
    assert c.pass_ms(8) == 55.0 and all(c.marginal_ms(n) >= 0 for n in range(1, 40))


def test_best_budget_maximises_expected_tokens_per_ms():
    c = PassCostModel({1: 40.0, 4: 44.0, 8: 60.0, 64: 200.0})

    def saturating(n):  # each extra node adds less: 1, 1.3, 1.51, ...
        return 1 + 0.9 * (1 - 0.7 ** (n - 1))

    best = c.best_budget(saturating, max_nodes=64)
    rates = {n: saturating(n) / c.pass_ms(n) for n in range(1, 65)}
    assert best == max(rates, key=rates.get) and 1 < best < 64
    assert c.best_budget(lambda n: 1.0) == 1  # nothing to gain: no tree
    assert PassCostModel({1: 40.0, 64: 40.0}).best_budget(lambda n: n, max_nodes=64) == 64  # a free tree: all of it
    # a per-step overhead (the draft) makes larger trees relatively cheaper
    assert c.best_budget(saturating, overhead_ms=200.0) >= best


def test_round_trip_and_validation():
    c = PassCostModel({1: 40.0, 8: 60.0}, past=256)
    d = PassCostModel.from_dict(c.to_dict())
    assert d.sizes == c.sizes and d.ms == c.ms and d.past == 256
    with pytest.raises(ValueError):
        PassCostModel({})
    with pytest.raises(ValueError):
        PassCostModel({0: 1.0})

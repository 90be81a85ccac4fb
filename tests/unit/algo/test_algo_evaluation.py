"""Evaluation statistics (pipeline.algo.evaluation) against hand-computed values and invariants."""

import itertools
import math

import pytest
import torch

from pipeline.algo import (
    best_of_n,
    best_of_n_kl,
    bootstrap_ci,
    calibration_bins,
    preference_probabilities,
    quantile_bins,
    win_outcomes,
)


def test_win_outcomes_count_ties_half():
    a = torch.tensor([[0.9, 0.2], [0.5, 0.0]])
    b = torch.tensor([[0.1, 0.3], [0.5, 0.0]])
    torch.testing.assert_close(win_outcomes(a, b), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert win_outcomes(a, b).mean().item() == 0.5  # (1 + 0 + 0.5 + 0.5) / 4


def test_bootstrap_of_a_constant_is_a_point():
    assert bootstrap_ci(torch.full((5, 3), 0.25), resamples=200, seed=0) == (0.25, 0.25, 0.25)


def test_bootstrap_of_two_prompts_by_hand():
    # Two prompts with means 0 and 1: a resample of 2 rows has mean 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1, and the interval at level 0.4 (30% and 70%) is [0.5, 0.5].
    values = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert bootstrap_ci(values, resamples=4000, seed=1) == (0.5, 0.0, 1.0)
    assert bootstrap_ci(values, resamples=4000, seed=1, level=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_resamples_prompts_not_samples():
    # 2 prompts x 8 samples: resampling prompts gives [0, 1] as above; resampling the 16 samples one by one
    # would give the mean of Binomial(16, 1/2) / 16, whose 95% interval is [0.25, 0.75].
    values = torch.tensor([[0.0] * 8, [1.0] * 8])
    assert bootstrap_ci(values, resamples=4000, seed=1) == (0.5, 0.0, 1.0)
    _, flat_low, flat_high = bootstrap_ci(values.reshape(-1), resamples=4000, seed=1)
    assert flat_low == pytest.approx(0.25) and flat_high == pytest.approx(0.75)


def test_bootstrap_interval_matches_the_normal_one_for_many_prompts():
    values = torch.bernoulli(torch.full((2000,), 0.3), generator=torch.Generator().manual_seed(0))
    mean, low, high = bootstrap_ci(values, resamples=2000, seed=0)
    half = 1.96 * math.sqrt(mean * (1 - mean) / len(values))  # ~0.020
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_is_seeded_and_rejects_empty_input():
    values = torch.rand(30)
    assert bootstrap_ci(values, resamples=100, seed=3) == bootstrap_ci(values, resamples=100, seed=3)
    with pytest.raises(ValueError, match="P >= 1"):
        bootstrap_ci(torch.zeros(0), resamples=10, seed=0)


def test_best_of_n_by_hand():
    # proxy [1, 3, 2], gold [10, 30, 20]. n = 2: subsets {0,1} -> 30, {0,2} -> 20, {1,2} -> 30: mean 80/3.
    proxy, gold = torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[10.0, 30.0, 20.0]])
    torch.testing.assert_close(best_of_n(proxy, gold, 1), torch.tensor([20.0], dtype=torch.float64))
    torch.testing.assert_close(best_of_n(proxy, gold, 2), torch.tensor([80 / 3], dtype=torch.float64))
    torch.testing.assert_close(best_of_n(proxy, gold, 3), torch.tensor([30.0], dtype=torch.float64))


def test_best_of_n_equals_the_mean_over_all_subsets():
    gen = torch.Generator().manual_seed(0)
    proxy, gold = torch.rand(3, 7, generator=gen), torch.rand(3, 7, generator=gen)
    for n in range(1, 8):
        for p in range(3):
            picks = [
                gold[p, max(s, key=lambda i: proxy[p, i].item())].item() for s in itertools.combinations(range(7), n)
            ]
            assert best_of_n(proxy, gold, n)[p].item() == pytest.approx(sum(picks) / len(picks), rel=1e-9)


def test_best_of_n_under_the_gold_itself_rises_with_n():
    gold = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    curve = [best_of_n(gold, gold, n).mean().item() for n in (1, 2, 4, 8, 16, 32, 64)]
    assert curve == sorted(curve) and curve[-1] == pytest.approx(gold.max(dim=1).values.mean().item())


def test_best_of_n_rejects_n_above_the_samples():
    with pytest.raises(ValueError, match="n <= M"):
        best_of_n(torch.zeros(2, 4), torch.zeros(2, 4), 8)


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(64) == pytest.approx(3.174508, abs=1e-6)  # 4.158883 - 0.984375


def test_preference_probabilities_by_hand():
    probs, outcomes = preference_probabilities(torch.tensor([0.0, math.log(3.0)]))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.75, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(outcomes, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_calibration_bins_by_hand():
    # 2 bins: [0, 0.5) holds 0.1 (outcome 0), 0.3 (outcome 1); [0.5, 1] holds 0.5, 0.9, 1.0 (outcomes 1, 1, 0).
    probs = torch.tensor([0.1, 0.3, 0.5, 0.9, 1.0])
    outcomes = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    cal = calibration_bins(probs, outcomes, 2)
    torch.testing.assert_close(cal.count, torch.tensor([2, 3]))
    torch.testing.assert_close(cal.confidence, torch.tensor([0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(cal.frequency, torch.tensor([0.5, 2 / 3], dtype=torch.float64))
    # ECE = (2 * |0.5 - 0.2| + 3 * |2/3 - 0.8|) / 5 = (0.6 + 0.4) / 5 = 0.2
    assert cal.ece == pytest.approx(0.2)
    torch.testing.assert_close(cal.edges, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))


def test_calibration_of_a_calibrated_predictor_is_near_the_diagonal():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(20000, generator=gen)
    outcomes = torch.bernoulli(probs, generator=gen)
    cal = calibration_bins(probs, outcomes, 10)
    assert cal.ece < 0.02
    torch.testing.assert_close(cal.frequency, cal.confidence, atol=0.04, rtol=0)


def test_calibration_marks_empty_bins():
    cal = calibration_bins(torch.tensor([0.95, 0.97]), torch.tensor([1.0, 1.0]), 4)
    assert cal.count.tolist() == [0, 0, 0, 2]
    assert torch.isnan(cal.confidence[:3]).all() and cal.frequency[3].item() == 1.0
    assert cal.ece == pytest.approx(0.04)


def test_quantile_bins_by_hand():
    x = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.5])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    xs, ys, count = quantile_bins(x, y, 2)  # sorted x: [0.1, 0.2, 0.3] | [0.4, 0.5]
    torch.testing.assert_close(xs, torch.tensor([0.2, 0.45], dtype=torch.float64))
    torch.testing.assert_close(ys, torch.tensor([1 / 3, 0.5], dtype=torch.float64))
    assert count.tolist() == [3, 2]
    assert quantile_bins(x, y, 10)[2].tolist() == [1] * 5  # never more bins than points

"""Advantage estimators: GAE, REINFORCE++, GRPO / Dr. GRPO / RLOO."""

import pytest
import torch

from pipeline.algo import (
    ADVANTAGES,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def test_gae_by_hand():
    # rewards [1, 0, 2], values [0.5, 1.0, 1.5], gamma 0.9, lam 0.8 (gamma * lam = 0.72); V after end = 0.
    # t=2: delta = 2 - 1.5 = 0.5                         A = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35            A = 0.35 + 0.72 * 0.5 = 0.71
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4             A = 1.4 + 0.72 * 0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = gae(
        torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]]), torch.ones(1, 3), gamma=0.9, lam=0.8
    )
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0]]))


def test_gae_skips_masked_positions():
    # Same trajectory as above with a padding token at the front, a hole inside and padding at the end.
    rewards = torch.tensor([[9.0, 1.0, 9.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 9.0, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[0, 1, 0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.9112, 0.0, 0.71, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 2.4112, 0.0, 1.71, 2.0, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_values():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    mask = torch.ones(4, 7)
    mask[1, 5:] = 0
    mask[2, :2] = 0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.where(mask.bool(), rewards, 0).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, torch.where(mask.bool(), reward_to_go, 0))
    torch.testing.assert_close(adv, torch.where(mask.bool(), reward_to_go - values, 0))


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.25]])
    adv, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    # delta_0 = 1 + 0.5 * 0.25 - 0.5 = 0.625;  delta_1 = 2 - 0.25 = 1.75
    torch.testing.assert_close(adv, torch.tensor([[0.625, 1.75]]))


def test_discounted_returns_by_hand():
    # rewards [0, 0, 1] with gamma 0.5 -> [0.25, 0.5, 1]
    out = discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.5, 1.0]]))
    # a hole is skipped, not counted as a step: [0, (masked), 1] -> [0.5, 0, 1]
    out = discounted_returns(torch.tensor([[0.0, 7.0, 1.0]]), torch.tensor([[1, 0, 1]]), gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 1.0]]))


def test_reinforce_pp_by_hand():
    # gamma 1: row 0 rewards [0, 0, 1] -> returns [1, 1, 1]; row 1 [0, -1, pad] -> [-1, -1, 0].
    # valid returns 1, 1, 1, -1, -1: mean 0.2, population var 1 - 0.04 = 0.96, std 0.9797959
    # advantages: 0.8 / 0.9797959 = 0.8164966; -1.2 / 0.9797959 = -1.2247449
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]))
    a, b = 0.8164966, -1.2247449
    torch.testing.assert_close(adv, torch.tensor([[a, a, a], [b, b, 0.0]]))


def test_grpo_by_hand():
    # group [1, 2, 3]: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-6)
    # group [0, 0, 0]: std 0 -> all zeros
    adv = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-6))


def test_dr_grpo_by_hand():
    # group [1, 2, 6]: mean 3 -> [-2, -1, 3]; no std scaling
    expected = torch.tensor([-2.0, -1.0, 3.0])
    torch.testing.assert_close(dr_grpo_advantages(torch.tensor([1.0, 2.0, 6.0]), group_size=3), expected)
    scores = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(grpo_advantages(scores, group_size=3, scale_by_std=False), expected)


def test_rloo_by_hand():
    # [1, 2, 3]: 1 - (2 + 3) / 2 = -1.5; 2 - (1 + 3) / 2 = 0; 3 - (1 + 2) / 2 = 1.5
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=3), torch.tensor([-1.5, 0.0, 1.5])
    )


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_group_advantages_are_zero_mean_per_group(name):
    torch.manual_seed(0)
    scores = torch.randn(5 * 4, dtype=torch.float64)
    adv = ADVANTAGES[name](scores, group_size=4)
    assert adv.shape == scores.shape
    torch.testing.assert_close(adv.view(5, 4).mean(-1), torch.zeros(5, dtype=torch.float64))


def test_grpo_groups_are_independent_and_std_normalized():
    torch.manual_seed(0)
    scores = torch.randn(3 * 8, dtype=torch.float64)
    adv = grpo_advantages(scores, group_size=8, eps=0.0).view(3, 8)
    torch.testing.assert_close(adv.std(-1), torch.ones(3, dtype=torch.float64))
    alone = grpo_advantages(scores[8:16], group_size=8, eps=0.0)
    torch.testing.assert_close(adv[1], alone)


def test_group_advantage_errors():
    with pytest.raises(ValueError, match="divisible"):
        grpo_advantages(torch.zeros(5), group_size=3)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 2), group_size=2)
    # Dr. GRPO with a single sample per prompt is defined (and zero).
    assert torch.equal(dr_grpo_advantages(torch.tensor([3.0, 4.0]), group_size=1), torch.zeros(2))

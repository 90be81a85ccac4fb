"""KL estimators, KL-shaped rewards, KL loss and KL controllers."""

import math

import pytest
import torch

from pipeline.algo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_loss,
    shaped_token_rewards,
)

LN2 = math.log(2.0)


def test_estimators_by_hand():
    # log r = ln 0.5 - ln 0.25 = ln 2 = 0.6931472
    # k1 = 0.6931472; k2 = ln(2)^2 / 2 = 0.2402265; k3 = 1/2 - 1 + ln 2 = 0.1931472
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(lp, ref, kind="k1").item() == pytest.approx(0.6931472, abs=1e-6)
    assert kl_estimate(lp, ref, kind="k2").item() == pytest.approx(0.2402265, abs=1e-6)
    assert kl_estimate(lp, ref, kind="k3").item() == pytest.approx(0.1931472, abs=1e-6)


def test_k1_and_k3_are_unbiased_for_exact_kl():
    # policy p = [0.5, 0.5], reference q = [0.25, 0.75]:
    # KL(p || q) = 0.5 ln 2 + 0.5 ln(2/3) = 0.3465736 - 0.2027326 = 0.1438410.
    # k3 per token: r = q/p = 0.5 -> 0.5 - 1 - ln 0.5 = 0.1931472; r = 1.5 -> 0.5 - ln 1.5 = 0.0945349.
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    for kind in ("k1", "k3"):
        expected = (p * kl_estimate(p.log(), q.log(), kind=kind)).sum().item()
        assert expected == pytest.approx(0.1438410, abs=1e-6)


def test_all_estimators_zero_when_equal_and_k2_k3_nonnegative():
    torch.manual_seed(0)
    lp, ref = -torch.rand(64, 16) * 5, -torch.rand(64, 16) * 5
    for kind in KL_ESTIMATORS:
        assert torch.equal(kl_estimate(lp, lp, kind=kind), torch.zeros_like(lp))
    assert (kl_estimate(lp, ref, kind="k3") >= 0).all()
    assert (kl_estimate(lp, ref, kind="k2") >= 0).all()


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), kind="k4")


def test_shaped_token_rewards_by_hand():
    # kl_coef 0.1, k1. Row 0: mask [0, 1, 1, 0], KL on token 1 is -1 - (-2) = 1 -> reward -0.1;
    # token 2 has KL 0 and is the last valid token -> gets score 2.
    # Row 1: KL 0.5 on each token -> -0.05 each; last token also gets score 5 -> 4.95.
    # Row 2: empty mask -> all zeros, its score (7) is dropped.
    scores = torch.tensor([2.0, 5.0, 7.0])
    logprobs = torch.full((3, 4), -1.0)
    ref = torch.tensor([[-9.0, -2.0, -1.0, -9.0], [-1.5] * 4, [-3.0] * 4])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    rewards, kl = shaped_token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[0.0, -0.1, 2.0, 0.0], [-0.05, -0.05, -0.05, 4.95], [0.0] * 4])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5] * 4, [0.0] * 4]))


def test_shaped_token_rewards_sum_to_score_minus_total_kl():
    torch.manual_seed(1)
    scores, lp, ref = torch.randn(4), -torch.rand(4, 6), -torch.rand(4, 6)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]])
    rewards, kl = shaped_token_rewards(scores, lp, ref, mask, kl_coef=0.2, kind="k3")
    torch.testing.assert_close(rewards.sum(-1), scores - 0.2 * kl.sum(-1))


def test_kl_loss_by_hand():
    # two tokens with k3 = 0.1931472 (as above), one with equal log-probs (0), one masked:
    # token-mean = 2 * 0.1931472 / 3 = 0.1287648
    lp = torch.tensor([[math.log(0.5), math.log(0.5), -1.0, -50.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25), -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert kl_loss(lp, ref, mask).item() == pytest.approx(0.1287648, abs=1e-6)
    # k1 with seq-mean-token-sum: one row, sum = 2 ln 2 = 1.3862944
    assert kl_loss(lp, ref, mask, kind="k1", agg="seq-mean-token-sum").item() == pytest.approx(2 * LN2)


def test_kl_loss_gradient_is_zero_on_masked_tokens():
    lp = torch.tensor([[-1.0, -2.0, 30.0]], requires_grad=True)
    loss = kl_loss(lp, torch.tensor([[-1.5, -1.5, -80.0]]), torch.tensor([[1, 1, 0]]))
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad[0, 2].item() == 0.0


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.coef == 0.05
    assert ctl.state_dict() == {"coef": 0.05}


def test_adaptive_controller_by_hand():
    # target 6, horizon 10000, 256 steps:
    # KL 12 -> error clip(12/6 - 1) = 0.2 -> coef 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    assert ctl.coef == pytest.approx(0.100512)
    # KL 3 -> error clip(-0.5) = -0.2 -> 0.1 * (1 - 0.00512) = 0.099488
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(torch.tensor(3.0), 256)
    assert ctl.coef == pytest.approx(0.099488)
    # KL 6.6 -> error 0.1 (inside the clip) -> 0.1 * (1 + 0.1 * 100 / 10000) = 0.1001
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, 100)
    assert ctl.coef == pytest.approx(0.1001)


def test_adaptive_controller_moves_toward_target():
    above, below, on = (AdaptiveKLController(0.1, target=1.0, horizon=100) for _ in range(3))
    for _ in range(10):
        above.update(2.0, 10)
        below.update(0.5, 10)
        on.update(1.0, 10)
    assert above.coef > 0.1 > below.coef
    assert on.coef == pytest.approx(0.1)


def test_controller_state_dict_round_trips():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=1000)
    ctl.update(10.0, 64)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    restored = AdaptiveKLController(0.2, target=3.0, horizon=1000)
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.coef == ctl.coef
    fixed = FixedKLController(1.0)
    fixed.load_state_dict({"coef": 0.3})
    assert fixed.coef == 0.3


def test_adaptive_controller_rejects_bad_config():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)

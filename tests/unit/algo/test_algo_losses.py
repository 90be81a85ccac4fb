"""PPO policy loss, value loss, entropy bonus and truncated IS weights."""

import math

import pytest
import torch

from pipeline.algo import entropy_bonus, ppo_policy_loss, truncated_is_weights, value_loss

CLIP = {"clip_low": 0.2, "clip_high": 0.2}


def test_ppo_at_ratio_one_is_minus_token_mean_advantage():
    # A = [1, -2, (masked) 3]: loss = mean(-1, 2) = 0.5; nothing clipped, approx KL 0.
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    loss, metrics = ppo_policy_loss(lp, lp.clone(), adv, torch.tensor([[1, 1, 0]]), **CLIP)
    assert loss.item() == pytest.approx(0.5)
    assert metrics["loss/policy"] == pytest.approx(0.5)
    assert metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/approx_kl"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_ppo_gradient_at_ratio_one_is_minus_advantage_over_count():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(lp, lp.detach(), torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([[1, 1, 0]]), **CLIP)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, 1.0, 0.0]]))


def test_ppo_clipping_by_hand():
    # token 0: ratio 1.5, A = 1:  unclipped -1.5, clipped -1.2 -> max -1.2 (clipped)
    # token 1: ratio 0.5, A = -2: unclipped  1.0, clipped  1.6 -> max  1.6 (clipped)
    # loss = (-1.2 + 1.6) / 2 = 0.2; clip_frac 1
    # approx KL (k3 of KL(old || new)): (1.5 - 1 - ln 1.5 + 0.5 - 1 - ln 0.5) / 2
    #   = (0.0945349 + 0.1931472) / 2 = 0.1438410
    old = torch.tensor([[-1.0, -1.0]])
    lp = (old + torch.tensor([[math.log(1.5), math.log(0.5)]])).requires_grad_()
    loss, metrics = ppo_policy_loss(lp, old, torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), **CLIP)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert metrics["policy/clip_frac"] == 1.0
    assert metrics["policy/approx_kl"] == pytest.approx(0.1438410, abs=1e-6)
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2))  # clipped tokens carry no gradient


def test_ppo_asymmetric_clip():
    # ratio 1.25 with A = 1: inside [0.8, 1.28] (clip_high 0.28, DAPO) -> loss -1.25, not clipped;
    # with the symmetric 0.2 range it is clipped to -1.2.
    old = torch.tensor([[-1.0]])
    lp = old + math.log(1.25)
    adv, mask = torch.tensor([[1.0]]), torch.ones(1, 1)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and metrics["policy/clip_frac"] == 0.0
    assert ppo_policy_loss(lp, old, adv, mask, **CLIP)[0].item() == pytest.approx(-1.2)


def test_ppo_dual_clip_by_hand():
    # ratio 5, A = -1: unclipped 5, clipped 1.2 -> PPO loss 5; dual clip c = 3 caps it at -c * A = 3.
    old = torch.tensor([[-2.0, -2.0]])
    lp = old + math.log(5.0)
    adv, mask = torch.tensor([[-1.0, 1.0]]), torch.tensor([[1, 0]])
    assert ppo_policy_loss(lp, old, adv, mask, **CLIP)[0].item() == pytest.approx(5.0)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, **CLIP, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert metrics["policy/dual_clip_frac"] == 1.0
    # positive advantages are untouched by the dual clip: ratio 5, A = 1 -> clipped at -1.2
    loss_pos, _ = ppo_policy_loss(lp, old, adv, torch.tensor([[0, 1]]), **CLIP, dual_clip=3.0)
    assert loss_pos.item() == pytest.approx(-1.2)
    with pytest.raises(ValueError):
        ppo_policy_loss(lp, old, adv, mask, **CLIP, dual_clip=1.0)


def test_ppo_aggregations_by_hand():
    # ratio 1: per-token loss -A. Row 0: [-1, -1], row 1: [-2].
    # token-mean -4/3; seq-mean-token-sum (-2 + -2) / 2 = -2; seq-mean-token-mean (-1 + -2) / 2 = -1.5
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, 5.0], [2.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = {"token-mean": -4 / 3, "seq-mean-token-sum": -2.0, "seq-mean-token-mean": -1.5}
    for agg, value in expected.items():
        assert ppo_policy_loss(lp, lp, adv, mask, **CLIP, agg=agg)[0].item() == pytest.approx(value)
    with pytest.raises(ValueError, match="token-mean"):
        ppo_policy_loss(lp, lp, adv, mask, **CLIP, agg="mean")


def test_ppo_sequence_level_advantages_broadcast():
    torch.manual_seed(0)
    lp, old = -torch.rand(3, 5), -torch.rand(3, 5)
    seq_adv = torch.randn(3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    a, ma = ppo_policy_loss(lp, old, seq_adv, mask, **CLIP)
    b, mb = ppo_policy_loss(lp, old, seq_adv[:, None].expand(3, 5), mask, **CLIP)
    assert a.item() == pytest.approx(b.item()) and ma == mb


def test_ppo_is_weights_scale_tokens():
    # ratio 1, A = 1 on both tokens, weights [0.5, 2] -> mean(-0.5, -2) = -1.25
    lp = torch.zeros(1, 2)
    weights = torch.tensor([[0.5, 2.0]])
    loss, _ = ppo_policy_loss(lp, lp, torch.ones(1, 2), torch.ones(1, 2), **CLIP, is_weights=weights)
    assert loss.item() == pytest.approx(-1.25)


def test_value_loss_by_hand():
    # token 0: V 1, V_old 0, R 0, clip 0.2: unclipped (1 - 0)^2 = 1; V_clip 0.2 -> 0.04; 0.5 * max = 0.5
    # token 1: V 2, V_old 2, R 0: both 4 -> 2.   mean = 1.25, nothing where clipped > unclipped.
    loss, metrics = value_loss(
        torch.tensor([[1.0, 2.0, 7.0]]),
        torch.tensor([[0.0, 2.0, -7.0]]),
        torch.zeros(1, 3),
        torch.tensor([[1, 1, 0]]),
        clip=0.2,
    )
    assert loss.item() == pytest.approx(1.25)
    assert metrics["value/clip_frac"] == 0.0
    assert metrics["loss/value"] == pytest.approx(1.25)


def test_value_loss_clipped_branch_by_hand():
    # V 0.5, V_old 0, R 1, clip 0.2: unclipped 0.25; V_clip 0.2 -> (0.2 - 1)^2 = 0.64 -> 0.5 * 0.64 = 0.32
    args = (torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1))
    loss, metrics = value_loss(*args, clip=0.2)
    assert loss.item() == pytest.approx(0.32) and metrics["value/clip_frac"] == 1.0
    # no clipping: 0.5 * 0.25 = 0.125
    assert value_loss(*args, clip=None)[0].item() == pytest.approx(0.125)


def test_entropy_bonus_by_hand():
    # valid token uniform over 4 -> ln 4 = 1.3862944; the masked token's logits are ignored.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1e4, -1e4, 0.0, 0.0]]])
    assert entropy_bonus(logits, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(4.0))


def test_truncated_is_weights_by_hand():
    # ratios 0.5 / 0.25 = 2 -> capped at 1.5; 0.9 / 0.9 = 1; masked -> 0
    lp = torch.tensor([[math.log(0.5), math.log(0.9), 1e6]], requires_grad=True)
    rollout = torch.tensor([[math.log(0.25), math.log(0.9), -1e6]])
    w = truncated_is_weights(lp, rollout, torch.tensor([[1, 1, 0]]), cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0, 0.0]]))
    assert not w.requires_grad

"""Reward learning and preference optimization losses, against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.algo import (
    DPO_LOSSES,
    bt_loss,
    demo_discriminator_loss,
    dpo_loss,
    ensemble_mean_std,
    uncertainty_penalized,
)

LOG2 = math.log(2.0)


def test_bt_loss_by_hand():
    # c = [1, 0], r = [0, 0]: mean(log(1 + e^-1), log 2) = mean(0.3132617, 0.6931472) = 0.5032044.
    loss, metrics = bt_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx(0.5032044, abs=1e-6)
    assert metrics["loss/rm"] == pytest.approx(0.5032044, abs=1e-6)
    assert metrics["rm/accuracy"] == 0.5  # the tie counts as wrong
    assert metrics["rm/margin"] == pytest.approx(0.5)
    assert metrics["rm/chosen_score"] == pytest.approx(0.5)
    assert metrics["rm/rejected_score"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_bt_loss_with_margin_by_hand():
    # margin 1: arguments [0, -1] -> mean(log 2, log(1 + e)) = mean(0.6931472, 1.3132617) = 1.0032044.
    loss, _ = bt_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(1.0032044, abs=1e-6)


def test_bt_loss_is_stable_for_large_gaps():
    loss, _ = bt_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert loss.item() == pytest.approx(2000.0)


def test_ensemble_mean_std_by_hand():
    # members [1, 2] and [3, 2]: mean [2, 2]; population std [1, 0].
    mean, std = ensemble_mean_std(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, 0.0]))
    # mean - 0.5 * std -> [1.5, 2]
    torch.testing.assert_close(uncertainty_penalized(mean, std, 0.5), torch.tensor([1.5, 2.0]))


def test_ensemble_of_one_has_zero_std():
    mean, std = ensemble_mean_std(torch.tensor([[0.3, -1.2]]))
    torch.testing.assert_close(mean, torch.tensor([0.3, -1.2]))
    assert torch.equal(std, torch.zeros(2))


def test_demo_discriminator_loss_by_hand():
    # demos [0, 2]: mean(log 2, log(1 + e^-2)) = mean(0.6931472, 0.1269280) = 0.4100376
    # policy [0]: log 2 = 0.6931472;  loss = (0.4100376 + 0.6931472) / 2 = 0.5515924
    loss, metrics = demo_discriminator_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(0.5515924, abs=1e-6)
    # demo accuracy 1/2 (0 is not > 0), policy accuracy 0/1 -> balanced 0.25
    assert metrics["disc/accuracy"] == pytest.approx(0.25)
    assert metrics["disc/demo_score"] == pytest.approx(1.0)
    assert metrics["disc/policy_score"] == 0.0


def test_demo_discriminator_halves_weigh_equally_regardless_of_counts():
    demo, policy = torch.tensor([0.5, -1.0]), torch.tensor([0.2, 1.5, -0.3])
    loss, _ = demo_discriminator_loss(demo, policy)
    loss_dup, _ = demo_discriminator_loss(demo, policy.repeat(5))
    assert loss.item() == pytest.approx(loss_dup.item())


def test_demo_discriminator_gradient_raises_demo_scores_and_lowers_policy_scores():
    demo, policy = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    loss, _ = demo_discriminator_loss(demo, policy)
    loss.backward()
    assert (demo.grad < 0).all() and (policy.grad > 0).all()


def test_demo_discriminator_rejects_empty_inputs():
    with pytest.raises(ValueError):
        demo_discriminator_loss(torch.zeros(0), torch.zeros(2))


# pc = -1, pr = -2, rc = rr = -1.5 -> logits = (pc - pr) - (rc - rr) = 1.
PAIR = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))


def test_dpo_sigmoid_by_hand():
    # beta = 0.5: -logsigmoid(0.5) = log(1 + e^-0.5) = 0.4740770.
    loss, metrics = dpo_loss(*PAIR, beta=0.5)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(0.5)).item())
    # implicit rewards: chosen 0.5 * (-1 + 1.5) = 0.25, rejected 0.5 * (-2 + 1.5) = -0.25.
    assert metrics["dpo/chosen_reward"] == pytest.approx(0.25)
    assert metrics["dpo/rejected_reward"] == pytest.approx(-0.25)
    assert metrics["dpo/reward_margin"] == pytest.approx(0.5)
    assert metrics["dpo/reward_accuracy"] == 1.0
    assert metrics["loss/dpo"] == pytest.approx(loss.item())


def test_dpo_label_smoothing_by_hand():
    # eps = 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.5240770
    loss, _ = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.5240770, abs=1e-6)


def test_ipo_by_hand():
    # beta = 0.25: (1 - 1 / (2 * 0.25))^2 = (1 - 2)^2 = 1;  beta = 0.5: (1 - 1)^2 = 0.
    assert dpo_loss(*PAIR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(*PAIR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(0.0)


def test_dpo_bad_arguments_raise():
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(*PAIR, beta=0.1, loss_type="hinge-ish")
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, beta=0.0)
    assert set(DPO_LOSSES) == {"sigmoid", "ipo"}


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)
    loss.backward()
    # at logits 0: d/dpc = -beta * sigmoid(0) = -0.05, d/dpr = +0.05
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)
    assert loss.item() == pytest.approx(LOG2)

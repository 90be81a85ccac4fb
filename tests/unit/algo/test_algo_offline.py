"""The offline stages' pure math against hand-computed values: SFT loss, pair logprobs (DPO / IPO), pair accuracy."""

import math

import pytest
import torch

from pipeline.algo import DPO_LOSSES, SEQUENCE_LOGPROBS, pair_accuracy, pair_logprobs, sft_loss


def test_sft_loss_is_the_mean_nll_over_response_tokens_by_hand():
    # row 0: tokens with logprobs ln 0.5, ln 0.25; row 1: ln 0.5 and a padded position (its -9 counts for nothing)
    # loss = -(ln 0.5 + ln 0.25 + ln 0.5) / 3 = (0.693147 + 1.386294 + 0.693147) / 3 = 4 ln 2 / 3 = 0.924196
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.5), -9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx(4 * math.log(2) / 3)
    assert metrics == {"loss/sft": pytest.approx(0.924196, abs=1e-6), "sft/tokens": 3.0}


def test_sft_loss_gradient_is_minus_one_over_token_count():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    sft_loss(logprobs, torch.tensor([[True, True], [True, False]]))[0].backward()
    # three tokens: d loss / d logprob = -1/3 on each, 0 on the padded one
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3], [-1 / 3, 0.0]]))


def test_pair_logprobs_sum_for_dpo_and_average_for_ipo():
    # rows interleaved: 0 = pair 0 chosen, 1 = pair 0 rejected, 2 = pair 1 chosen, 3 = pair 1 rejected
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # sigmoid (DPO): sums -1-2-3 = -6, -4; -1-1 = -2, -2
    chosen, rejected = pair_logprobs(logprobs, mask, "sigmoid")
    assert chosen.tolist() == [-6.0, -2.0] and rejected.tolist() == [-4.0, -2.0]
    # ipo: means -6/3 = -2, -4/1 = -4; -2/2 = -1, -2/1 = -2
    chosen, rejected = pair_logprobs(logprobs, mask, "ipo")
    assert chosen.tolist() == [-2.0, -1.0] and rejected.tolist() == [-4.0, -2.0]
    assert set(SEQUENCE_LOGPROBS) == set(DPO_LOSSES)  # every DPO loss says how it takes a sequence's logprob


def test_pair_accuracy_counts_ties_half():
    # wins 1 (1 > 0), 0 (0 < 1), 0.5 (2 = 2), 1 (5 > 4): (1 + 0 + 0.5 + 1) / 4 = 0.625
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 4.0])).item() == 0.625


def test_pair_accuracy_of_float64_scores_is_the_exact_fraction():
    # 1 win of 3: float64 gives 1/3 exactly as Python does; float32 only to its precision
    chosen, rejected = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    exact = pair_accuracy(chosen.double(), rejected.double())
    assert exact.dtype == torch.float64 and exact.item() == 1 / 3
    assert pair_accuracy(chosen, rejected).dtype == torch.float32
    assert pair_accuracy(chosen.bfloat16(), rejected.bfloat16()).dtype == torch.float32  # never below float32

"""Masked reductions, loss aggregation, token log-probs and entropy, against hand-computed values."""

import math

import pytest
import torch

from pipeline.algo import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    entropy_from_logits,
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_logprobs,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_masked_sum_and_mean_by_hand():
    # valid entries: 1, 2 -> sum 3, mean 1.5; row 2 is empty -> row sum 0, row mean 0 (not NaN).
    assert masked_sum(X, MASK).item() == 3.0
    assert masked_mean(X, MASK).item() == 1.5
    torch.testing.assert_close(masked_sum(X, MASK, dim=-1), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=-1), torch.tensor([1.5, 0.0]))
    # dim=0: column means over rows where the mask is set -> [1, 2, 0 (empty column)].
    torch.testing.assert_close(masked_mean(X, MASK, dim=0), torch.tensor([1.0, 2.0, 0.0]))


def test_masked_mean_bool_mask_equals_float_mask():
    assert masked_mean(X, MASK.bool()).item() == masked_mean(X, MASK).item()


def test_all_zero_mask_gives_zero_not_nan():
    empty = torch.zeros_like(X)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    assert torch.equal(masked_whiten(X, empty), torch.zeros_like(X))


def test_masked_ops_ignore_inf_and_nan_padding():
    garbage = torch.where(MASK.bool(), X, torch.tensor([[math.inf, math.nan, math.inf], [math.nan] * 3]))
    assert masked_mean(garbage, MASK).item() == 1.5
    assert masked_sum(garbage, MASK).item() == 3.0


def test_masked_var_is_population_variance():
    # values 1, 3: mean 2, squared deviations 1, 1 -> population variance 1 (Bessel would give 2).
    x = torch.tensor([1.0, 3.0, 100.0])
    m = torch.tensor([True, True, False])
    assert masked_var(x, m).item() == pytest.approx(1.0)


def test_masked_whiten_by_hand():
    # values 1, 3: mean 2, std 1 -> -1, 1; masked position -> 0.
    x = torch.tensor([[1.0, 3.0, 1e6]])
    m = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(masked_whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]))
    # shift_mean=False only rescales: (x - 2) / 1 + 2 -> 1, 3.
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False), torch.tensor([[1.0, 3.0, 0.0]]))


def test_last_valid_index_with_leading_trailing_and_interior_zeros():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    last, has_any = last_valid_index(mask)
    assert last.tolist() == [2, 0, 2, 3]
    assert has_any.tolist() == [True, False, True, True]


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert aggregate_loss(loss, mask, agg="token-mean").item() == pytest.approx(2.5)
    # seq-mean-token-sum: row sums 6, 4 (empty row left out) -> 5
    assert aggregate_loss(loss, mask, agg="seq-mean-token-sum").item() == pytest.approx(5.0)
    # seq-mean-token-mean: row means 2, 4 -> 3
    assert aggregate_loss(loss, mask, agg="seq-mean-token-mean").item() == pytest.approx(3.0)
    assert set(LOSS_AGGREGATIONS) == {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean"}


def test_aggregations_of_empty_batch_are_zero():
    loss = torch.ones(2, 3)
    for agg in LOSS_AGGREGATIONS:
        assert aggregate_loss(loss, torch.zeros(2, 3), agg=agg).item() == 0.0


def test_unknown_agg_raises():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.ones(1, 2), torch.ones(1, 2), agg="sum")


def test_token_logprobs_by_hand():
    # logits [0, ln 3] -> probs [1/4, 3/4]; log(3/4) = -0.2876821, log(1/4) = -1.3862944.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    out = token_logprobs(logits, tokens)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[-0.2876821, -1.3862944]]))


def test_token_logprobs_computes_in_float32():
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    tokens = torch.randint(0, 5, (2, 3))
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected)


def test_entropy_by_hand():
    # probs [1/4, 3/4]: H = 1/4 ln 4 + 3/4 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351.
    # uniform over 4: ln 4 = 1.3862944; a -inf logit has p = 0: [0, 0, -inf] -> ln 2 = 0.6931472.
    logits = torch.tensor([[[0.0, math.log(3.0), -math.inf, -math.inf]], [[0.0, 0.0, 0.0, 0.0]]])
    banned = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351], [1.3862944]]))
    torch.testing.assert_close(entropy_from_logits(banned), torch.tensor([[0.6931472]]))

"""Property: whatever sits at masked positions (huge values, inf, NaN) never changes any output."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.algo import (
    LOSS_AGGREGATIONS,
    gae,
    kl_loss,
    masked_mean,
    ppo_policy_loss,
    reinforce_pp_advantages,
    shaped_token_rewards,
)

# database=None: keep hypothesis from writing a .hypothesis/ folder into the repo root.
SETTINGS = settings(max_examples=50, deadline=None, database=None)
GARBAGE = st.sampled_from([1e6, -1e6, 1e30, -1e30, 88.0, math.inf, -math.inf, math.nan])
FINITE = st.floats(-5.0, 5.0, allow_nan=False)
LOGPROB = st.floats(-8.0, 0.0, allow_nan=False)


@st.composite
def masked_batch(draw, *elements):
    """One [B, T] float64 tensor per element strategy, a mask (bool or 0/1 float), and copies of the
    tensors with garbage written at the masked positions."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    clean, dirty = [], []
    for element in elements:
        x = torch.tensor([[draw(element) for _ in range(t)] for _ in range(b)], dtype=torch.float64)
        garbage = torch.tensor([[draw(GARBAGE) for _ in range(t)] for _ in range(b)], dtype=torch.float64)
        clean.append(x)
        dirty.append(torch.where(mask, x, garbage))
    if draw(st.booleans()):
        mask = mask.double()
    return clean, dirty, mask


def assert_same(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a == b
    else:
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@SETTINGS
@given(masked_batch(FINITE), st.sampled_from([None, 0, 1]))
def test_masked_mean(batch, dim):
    (x,), (x_dirty,), mask = batch
    assert_same(masked_mean(x, mask, dim), masked_mean(x_dirty, mask, dim))


@SETTINGS
@given(masked_batch(FINITE, FINITE), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_gae(batch, gamma, lam):
    (r, v), (r_dirty, v_dirty), mask = batch
    assert_same(gae(r, v, mask, gamma=gamma, lam=lam), gae(r_dirty, v_dirty, mask, gamma=gamma, lam=lam))


@SETTINGS
@given(
    masked_batch(LOGPROB, LOGPROB, FINITE),
    st.sampled_from(sorted(LOSS_AGGREGATIONS)),
    st.sampled_from([None, 3.0]),
    st.booleans(),
)
def test_ppo_policy_loss(batch, agg, dual_clip, sequence_level):
    (lp, old, adv), (lp_dirty, old_dirty, adv_dirty), mask = batch
    if sequence_level:
        adv = adv_dirty = adv[:, 0]
    kwargs = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": dual_clip, "agg": agg}
    clean = ppo_policy_loss(lp.requires_grad_(), old, adv, mask, **kwargs)
    dirty = ppo_policy_loss(lp_dirty.requires_grad_(), old_dirty, adv_dirty, mask, **kwargs)
    assert_same(clean, dirty)
    clean[0].backward()
    dirty[0].backward()
    assert_same(lp.grad, lp_dirty.grad)


@SETTINGS
@given(masked_batch(LOGPROB, LOGPROB), st.sampled_from(["k1", "k2", "k3"]))
def test_shaped_token_rewards(batch, kind):
    (lp, ref), (lp_dirty, ref_dirty), mask = batch
    scores = torch.arange(lp.shape[0], dtype=torch.float64)
    assert_same(
        shaped_token_rewards(scores, lp, ref, mask, kl_coef=0.05, kind=kind),
        shaped_token_rewards(scores, lp_dirty, ref_dirty, mask, kl_coef=0.05, kind=kind),
    )


@SETTINGS
@given(masked_batch(FINITE), st.floats(0.5, 1.0))
def test_reinforce_pp(batch, gamma):
    (r,), (r_dirty,), mask = batch
    assert_same(reinforce_pp_advantages(r, mask, gamma=gamma), reinforce_pp_advantages(r_dirty, mask, gamma=gamma))


@SETTINGS
@given(
    masked_batch(LOGPROB, LOGPROB),
    st.sampled_from(["k1", "k2", "k3"]),
    st.sampled_from(sorted(LOSS_AGGREGATIONS)),
)
def test_kl_loss(batch, kind, agg):
    (lp, ref), (lp_dirty, ref_dirty), mask = batch
    clean = kl_loss(lp.requires_grad_(), ref, mask, kind=kind, agg=agg)
    dirty = kl_loss(lp_dirty.requires_grad_(), ref_dirty, mask, kind=kind, agg=agg)
    assert_same(clean, dirty)
    clean.backward()
    dirty.backward()
    assert_same(lp.grad, lp_dirty.grad)

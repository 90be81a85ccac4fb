"""Experience assembly: chunks -> advantages -> learner shards, checked against hand-computed values."""

import pytest
import torch

from pipeline.algo import gae, grpo_advantages, masked_whiten, reinforce_pp_advantages, rloo_advantages
from pipeline.batches import concat_batches, pad_left, pad_right
from pipeline.config import AlgoConfig
from pipeline.experience import (
    Chunk,
    chunk_experience,
    combine_metrics,
    concat_rollouts,
    make_train_batches,
    stage_seconds,
)
from pipeline.types import Rollouts

GOLD = "pipeline.tasks.synthetic:gold_reward"


def rollouts(prompt_rows, response_rows, logprob_rows, g=2, version=3) -> Rollouts:
    prompt_ids, prompt_mask = pad_left(prompt_rows, 0)
    response_ids, response_mask = pad_right(response_rows, 0, torch.long)
    return Rollouts(
        prompts=[f"p{i // g}" for i in range(len(prompt_rows))],
        responses=[" ka ." for _ in prompt_rows],
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=pad_right(logprob_rows, 0.0, torch.float32)[0],
        finish_reasons=["stop"] * len(prompt_rows),
        weight_version=version,
        group_size=g,
    )


def two_chunks():
    # chunk A: prompt [1, 2], 2 samples with 2 and 1 tokens; chunk B: prompt [3], 2 samples with 3 and 1 tokens
    a = rollouts([[1, 2], [1, 2]], [[5, 6], [7]], [[-1.0, -2.0], [-0.5]])
    b = rollouts([[3], [3]], [[8, 9, 10], [11]], [[-1.0, -1.0, -1.0], [-3.0]])
    ref_a = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])  # k1 per token: 0.5, 0 | 0
    ref_b = torch.tensor([[-1.0, -1.0, -2.0], [-3.0, 0.0, 0.0]])  # 0, 0, 1 | 0
    return [Chunk(a, torch.tensor([1.0, 0.0]), ref_a), Chunk(b, torch.tensor([0.0, 2.0]), ref_b)]


def test_concat_repads_prompts_left_and_responses_right():
    r = concat_rollouts([c.rollouts for c in two_chunks()])
    assert r.prompt_ids.tolist() == [[1, 2], [1, 2], [0, 3], [0, 3]]
    assert r.prompt_mask.tolist() == [[True, True]] * 2 + [[False, True]] * 2
    assert r.response_ids.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10], [11, 0, 0]]
    assert r.rollout_logprobs[2].tolist() == [-1.0, -1.0, -1.0] and r.rollout_logprobs[1].tolist() == [-0.5, 0, 0]
    assert len(r) == 4 and r.group_size == 2 and r.weight_version == 3


def test_grpo_subtracts_the_summed_kl_then_normalizes_per_group():
    algo = AlgoConfig(name="grpo")
    (batch,), metrics = make_train_batches(two_chunks(), algo, kl_coef=0.1, world_size=1)
    # sequence KL (k1 sums): 0.5, 0, 1, 0 -> adjusted scores 1 - 0.05, 0, 0 - 0.1, 2
    expected = grpo_advantages(torch.tensor([0.95, 0.0, -0.1, 2.0]), group_size=2)
    assert batch.advantages[:, 0].tolist() == pytest.approx(expected.tolist())
    assert batch.advantages[1, 1:].abs().sum() == 0  # masked positions stay 0
    assert metrics["kl/ref"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert metrics["reward/mean"] == pytest.approx(0.75)
    assert metrics["tokens"] == 7 and metrics["samples"] == 4
    assert batch.kl_coef == 0.0  # the penalty is in the reward, not in the loss


def test_rloo_and_kl_as_a_loss_term():
    algo = AlgoConfig(name="rloo", kl={"mode": "loss"})
    (batch,), _ = make_train_batches(two_chunks(), algo, kl_coef=0.1, world_size=1)
    assert batch.advantages[:, 0].tolist() == pytest.approx(
        rloo_advantages(torch.tensor([1.0, 0, 0, 2]), group_size=2).tolist()
    )
    assert batch.kl_coef == 0.1 and batch.ref_logprobs is not None


def test_reinforce_pp_whitens_kl_shaped_returns():
    algo = AlgoConfig(name="reinforce_pp")
    (batch,), _ = make_train_batches(two_chunks(), algo, kl_coef=0.1, world_size=1)
    # token rewards: -0.1 * kl on each token, + score on the last valid token
    rewards = torch.tensor([[-0.05, 1.0, 0], [0.0, 0, 0], [0, 0, -0.1 + 0.0], [2.0, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    expected, returns = reinforce_pp_advantages(rewards, mask)
    assert torch.allclose(batch.advantages, expected, atol=1e-6)
    assert returns[0, 0].item() == pytest.approx(0.95)


def test_ppo_uses_gae_on_critic_values():
    chunks = [
        Chunk(c.rollouts, c.scores, c.ref_logprobs, values=torch.full_like(c.ref_logprobs, 0.5)) for c in two_chunks()
    ]
    algo = AlgoConfig(name="ppo", gamma=1.0, lam=1.0)
    (batch,), _ = make_train_batches(chunks, algo, kl_coef=0.0, world_size=1)
    mask = batch.response_mask
    values = torch.where(mask, 0.5, 0.0)
    rewards = torch.zeros_like(values)
    rewards[0, 1], rewards[2, 2], rewards[3, 0] = 1.0, 0.0, 2.0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(batch.advantages, masked_whiten(adv, mask), atol=1e-6)
    assert torch.allclose(batch.returns, ret) and batch.returns[0, 0].item() == pytest.approx(1.0)


def test_shards_split_rows_and_gold_is_measured():
    shards, metrics = make_train_batches(
        two_chunks(), AlgoConfig(name="grpo"), kl_coef=0.0, world_size=2, gold_reward=GOLD
    )
    assert [len(s) for s in shards] == [2, 2]
    assert shards[1].response_ids[0].tolist() == [8, 9, 10]
    assert metrics["gold_reward/mean"] == 0.0  # " ka ." is not a sentence
    with pytest.raises(ValueError, match="equal"):
        make_train_batches(two_chunks(), AlgoConfig(name="grpo"), kl_coef=0.0, world_size=3)


def test_chunk_by_chunk_equals_the_joined_step_for_group_methods():
    # The experience stream computes advantages and metrics per chunk; for GRPO (group baselines) joining the
    # chunk batches and combining the chunk metrics must give what the whole step gives.
    algo = AlgoConfig(name="grpo")
    (whole,), whole_metrics = make_train_batches(two_chunks(), algo, kl_coef=0.1, world_size=1, gold_reward=GOLD)
    parts = [chunk_experience(c, algo, kl_coef=0.1, gold_reward=GOLD) for c in two_chunks()]
    joined = concat_batches([b for b, _ in parts])
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "advantages", "old_logprobs"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    combined = combine_metrics([m for _, m in parts])
    assert combined.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert combined[key] == pytest.approx(value, abs=1e-6), key


def test_pooled_std_by_hand():
    # values [1, 3] and [5]: mean 3, sample std sqrt(((1-3)^2 + 0 + (5-3)^2) / 2) = 2
    parts = [{"r/mean": 2.0, "r/std": 2**0.5, "samples": 2.0}, {"r/mean": 5.0, "r/std": 0.0, "samples": 1.0}]
    out = combine_metrics(parts)
    assert out["r/mean"] == pytest.approx(3.0) and out["r/std"] == pytest.approx(2.0) and out["samples"] == 3.0


def test_stage_seconds_gives_each_moment_to_the_earliest_busy_stage():
    # window [0, 10]: gen 1-4 (chunk 0) and 3-6 (chunk 1), reward 4-7 overlaps gen until 6, ref 7-8, idle 8-10
    intervals = [("gen", 1.0, 4.0), ("gen", 3.0, 6.0), ("reward", 4.0, 7.0), ("ref", 7.0, 8.0), ("ref", -5.0, -4.0)]
    out = stage_seconds(intervals, 0.0, 10.0)
    assert out == {"gen": 5.0, "reward": 1.0, "ref": 1.0, "values": 0.0, "advantage": 0.0, "stream": 3.0}
    assert sum(out.values()) == pytest.approx(10.0)

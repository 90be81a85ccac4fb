"""PolicyLearner / ValueLearner as plain classes in this process (world size 1): plain torch and DeepSpeed stage 0."""

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from actors.critic import ValueLearner
from actors.learner import PolicyLearner
from cluster.local import free_port
from pipeline.algo import masked_mean
from pipeline.batches import pad_left, pad_right, shard
from pipeline.config import AlgoConfig, LearnerConfig
from pipeline.types import TrainBatch


def make_batch(n: int, *, seed: int, vocab: int = 300) -> TrainBatch:
    """n sequences of random tokens: prompts of 2-6 tokens (left-padded), responses of 1-6 (right-padded).
    Logprobs are zeros and advantages per-token normal; callers replace what they need."""
    g = random.Random(seed)
    prompts, p_mask = pad_left([[g.randrange(3, vocab) for _ in range(g.randint(2, 6))] for _ in range(n)], 2)
    responses, r_mask = pad_right(
        [[g.randrange(3, vocab) for _ in range(g.randint(1, 6))] for _ in range(n)], 2, torch.long
    )
    advantages = torch.where(r_mask, torch.randn(r_mask.shape, generator=torch.Generator().manual_seed(seed)), 0.0)
    return TrainBatch(prompts, p_mask, responses, r_mask, old_logprobs=torch.zeros(r_mask.shape), advantages=advantages)


def learner(task_dir, cls=PolicyLearner, algo: AlgoConfig | None = None, **cfg) -> PolicyLearner:
    cfg = {"backend": "torch", "micro_batch_size": 3, **cfg}
    out = cls(LearnerConfig(**cfg), algo or AlgoConfig(), task_dir / "models/policy", master_port=free_port())
    out.setup()
    return out


def on_policy(lrn: PolicyLearner, batch: TrainBatch, **changes) -> TrainBatch:
    """The batch with old_logprobs = the learner's current logprobs (ratio 1 on the first update)."""
    old = lrn.compute_logprobs(batch)
    return TrainBatch(**{**batch.__dict__, "old_logprobs": old, **changes})


def test_loss_at_ratio_one_is_minus_mean_advantage_and_mismatch_is_measured(task_dir):
    lrn = learner(task_dir)
    batch = make_batch(7, seed=1)  # 3 micro-batches of 3, 3, 1 sequences with different token counts
    old = lrn.compute_logprobs(batch)
    rollout = torch.where(batch.response_mask, old, 0.0)
    rollout[2, 0] += 0.25  # one valid token disagrees with the learner
    rollout[~batch.response_mask] = 99.0  # padding must not count
    metrics = lrn.train_step(on_policy(lrn, batch, rollout_logprobs=rollout))
    expected = -masked_mean(batch.advantages, batch.response_mask).item()
    assert metrics["loss/policy"] == pytest.approx(expected, abs=1e-6)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/clip_frac"] == 0.0
    assert metrics["mismatch/logprob_abs_max"] == pytest.approx(0.25, abs=1e-5)
    assert metrics["policy/grad_norm"] > 0 and lrn.optimizer_steps() == 1


def test_positive_advantages_raise_logprobs(task_dir):
    lrn = learner(task_dir, lr=1e-3, epochs=2)
    batch = make_batch(6, seed=2)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]).unsqueeze(1)
    batch = on_policy(lrn, batch, advantages=torch.where(batch.response_mask, sign, 0.0))
    before = (batch.old_logprobs * batch.response_mask).sum(dim=1)
    lrn.train_step(batch)
    after = (lrn.compute_logprobs(batch) * batch.response_mask).sum(dim=1)
    assert torch.all((after - before) * sign.squeeze(1) > 0), (after - before).tolist()


def test_gather_weights_load_into_llama(task_dir):
    lrn = learner(task_dir)
    weights = dict(lrn.gather_weights())
    model = LlamaForCausalLM.from_pretrained(task_dir / "models/policy")
    model.load_state_dict(weights, strict=True)
    assert all(w.device.type == "cpu" for w in weights.values())
    assert torch.equal(weights["lm_head.weight"], lrn.engine.module.lm_head.weight.detach().cpu())


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_checkpoint_round_trip(task_dir, tmp_path, backend):
    lrn = learner(task_dir, backend=backend, zero_stage=0, warmup_steps=3)
    batch = make_batch(4, seed=3)
    lrn.train_step(on_policy(lrn, batch))
    lrn.save_checkpoint(tmp_path / "ckpt")
    saved, lr = dict(lrn.gather_weights()), lrn.engine.lr
    lrn.train_step(on_policy(lrn, batch))
    assert lrn.optimizer_steps() == 2 and lrn.engine.lr > lr  # still warming up
    lrn.load_checkpoint(tmp_path / "ckpt")
    assert lrn.optimizer_steps() == 1 and lrn.engine.lr == pytest.approx(lr)
    assert all(torch.equal(w, saved[n]) for n, w in lrn.gather_weights())
    # The optimizer state came back too: the same next update from the restored state, twice.
    lrn.train_step(on_policy(lrn, batch))
    again = dict(lrn.gather_weights())
    lrn.load_checkpoint(tmp_path / "ckpt")
    lrn.train_step(on_policy(lrn, batch))
    assert all(torch.allclose(w, again[n], rtol=0, atol=1e-7) for n, w in lrn.gather_weights())


def test_save_pretrained_writes_a_loadable_hf_dir(task_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lrn = learner(task_dir)
    lrn.save_pretrained(tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert AutoTokenizer.from_pretrained(tmp_path / "policy").pad_token == "<|pad|>"
    weights = dict(lrn.gather_weights())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_value_learner_fits_returns(task_dir):
    critic = learner(task_dir, ValueLearner, AlgoConfig(value_clip=None), lr=3e-3, micro_batch_size=4)
    batch = make_batch(4, seed=4)
    values = critic.compute_values(batch)
    assert values.shape == batch.response_mask.shape and torch.all(values[~batch.response_mask] == 0)
    returns = torch.where(batch.response_mask, 1.0, 0.0)
    batch = TrainBatch(**{**batch.__dict__, "returns": returns, "old_values": values})
    losses = [critic.train_step(batch)["loss/value"] for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_shard_splits_every_per_sequence_field():
    batch = make_batch(6, seed=5)
    parts = shard(batch, 3)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert torch.equal(torch.cat([p.advantages for p in parts]), batch.advantages)
    assert parts[1].ref_logprobs is None
    with pytest.raises(ValueError, match="equal"):
        shard(batch, 4)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_non_finite_reward_or_loss_skips_the_update(task_dir, backend):
    lrn = learner(task_dir, backend=backend, zero_stage=0)
    before = [p.detach().clone() for p in lrn.engine.module.parameters()]
    batch = on_policy(lrn, make_batch(7, seed=2))
    row = next(i for i in range(3, 6) if batch.response_mask[i].sum() >= 2)  # in micro-batch 2, >= 2 tokens

    def with_advantage(value: float) -> TrainBatch:
        adv = batch.advantages.clone()
        adv[row][batch.response_mask[row]] = value
        return TrainBatch(**{**batch.__dict__, "advantages": adv})

    m = lrn.train_step(with_advantage(float("nan")))  # a NaN reward: caught before any forward
    assert m["bad/reward"] == 1.0 and m["bad/skipped"] == 1.0 and "loss/policy" not in m
    # finite inputs, but the token sum of 3e38 overflows: micro-batch 1's loss is finite, micro-batch 2's is not
    m = lrn.train_step(with_advantage(3e38))
    assert m["bad/loss"] == 1.0 and m["bad/skipped"] == 1.0
    after = list(lrn.engine.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert lrn.optimizer_steps() == 0
    m = lrn.train_step(batch)  # a good batch still updates, with no gradient left over from the skipped ones
    assert "bad/skipped" not in m and lrn.optimizer_steps() == 1
    fresh = learner(task_dir, backend=backend, zero_stage=0)
    fresh.train_step(batch)
    assert all(
        torch.allclose(a, b, rtol=0, atol=1e-7)
        for a, b in zip(lrn.engine.module.parameters(), fresh.engine.module.parameters(), strict=True)
    )


def test_an_actor_takes_the_threads_it_is_given_and_keeps_its_own_without_a_count():
    from actors.hf import set_cpu_threads

    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(3) == 3 == torch.get_num_threads()  # the plan's count (Ray alone would leave 1)
        assert set_cpu_threads(0) == 3 == torch.get_num_threads()  # none planned: the process keeps its count
    finally:
        torch.set_num_threads(before)

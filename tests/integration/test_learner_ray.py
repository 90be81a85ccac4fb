"""Two DeepSpeed learner ranks as Ray actors (gloo on CPU): one update under ZeRO 0, 2 and 3 equals a
single-process torch AdamW update on the whole batch.

The check is made sensitive to the gradient's size, not just its sign: adam_eps = 1 puts Adam's first update
in its linear range (lr * g / (|g| + 1)), so a loss weighted wrongly across micro-batches or ranks shows up.
The batch has sequences of different lengths, token-mean aggregation, micro-batches smaller than a shard,
clipped ratios, truncated IS weights and a KL loss term: every weighting the learner does is exercised.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.learner import LearnerGroup, PolicyLearner
from actors.sequences import response_logprobs
from pipeline.algo import kl_loss, ppo_policy_loss, truncated_is_weights
from pipeline.config import AlgoConfig, KLConfig, LearnerConfig
from pipeline.types import TrainBatch
from tests.unit.test_learner import make_batch

pytestmark = pytest.mark.slow

LEARNER = {"num_workers": 2, "lr": 1e-2, "adam_eps": 1.0, "weight_decay": 0.1, "micro_batch_size": 2, "grad_clip": 1e6}
ALGO = AlgoConfig(clip_low=0.1, clip_high=0.1, tis_cap=1.02, kl=KLConfig(coef=0.5, estimator="k3", mode="loss"))


def logprobs_of(model, batch: TrainBatch) -> torch.Tensor:
    return response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)


@pytest.fixture(scope="module")
def reference(task_dir):
    """(batch, initial logprobs, initial weights, weights after one single-process torch AdamW step on the
    whole batch)."""
    model = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy", dtype=torch.float32)
    batch = make_batch(8, seed=11)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = logprobs_of(model, batch)
    noise = [scale * torch.randn(start.shape, generator=g) for scale in (0.15, 0.15, 0.05)]
    mask = batch.response_mask
    batch = TrainBatch(
        **{
            **batch.__dict__,
            "old_logprobs": torch.where(mask, start + noise[0], 0.0),  # some ratios leave the clip range
            "ref_logprobs": torch.where(mask, start + noise[1], 0.0),
            "rollout_logprobs": torch.where(mask, start + noise[2], 0.0),  # a slightly different engine
        }
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = LearnerConfig(**LEARNER)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    logprobs = logprobs_of(model, batch)
    is_weights = truncated_is_weights(start, batch.rollout_logprobs, mask, cap=ALGO.tis_cap)
    assert 0 < (is_weights[mask] == ALGO.tis_cap).float().mean() < 1
    loss, metrics = ppo_policy_loss(
        logprobs,
        batch.old_logprobs,
        batch.advantages,
        mask,
        clip_low=ALGO.clip_low,
        clip_high=ALGO.clip_high,
        is_weights=is_weights,
    )
    assert 0 < metrics["policy/clip_frac"] < 1
    loss = loss + ALGO.kl.coef * kl_loss(logprobs, batch.ref_logprobs, mask, kind="k3")
    loss.backward()
    opt.step()
    return batch, start, initial, {n: p.detach().clone() for n, p in model.named_parameters()}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together."""
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in b)
    return float(num.sqrt() / sum((b[n].double() ** 2).sum() for n in b).sqrt())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_matches_single_process_adamw(local_ray, task_dir, reference, tmp_path, stage):
    batch, start, initial, expected = reference
    cfg = LearnerConfig(**LEARNER, zero_stage=stage)
    group = LearnerGroup(PolicyLearner, cfg, ALGO, task_dir / "models/policy", seed=0)
    try:
        setup_s = group.setup()
        torch.testing.assert_close(group.compute_logprobs(batch), start, rtol=0, atol=1e-5)
        metrics = group.train_step(batch)
        weights = dict(group.gather_weights())
        group.save_pretrained(tmp_path / "policy")
    finally:
        group.shutdown()
    assert weights.keys() == expected.keys()
    weights_rel = rel_diff(weights, expected)
    update_rel = rel_diff({n: weights[n] - initial[n] for n in weights}, {n: expected[n] - initial[n] for n in weights})
    print(
        f"zero{stage}: setup {max(setup_s):.1f}s step {metrics['timing/learner_step']:.2f}s "
        f"weights rel {weights_rel:.1e} update rel {update_rel:.1e}"
    )
    assert weights_rel <= 1e-5
    assert update_rel <= 1e-5
    mismatch = (start - batch.rollout_logprobs)[batch.response_mask].abs().max().item()
    assert metrics["mismatch/logprob_abs_max"] == pytest.approx(mismatch, abs=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert all(torch.equal(p, weights[n]) for n, p in saved.named_parameters())


def test_value_learner_group_in_placement_group(local_ray, task_dir):
    from ray.util.placement_group import placement_group, remove_placement_group

    from actors.critic import ValueLearner

    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    local_ray.get(pg.ready())
    cfg = LearnerConfig(num_workers=2, zero_stage=2, lr=1e-3, micro_batch_size=2)
    group = LearnerGroup(ValueLearner, cfg, AlgoConfig(value_clip=None), task_dir / "models/policy", placement_group=pg)
    try:
        group.setup()
        batch = make_batch(4, seed=12)
        values = group.compute_values(batch)
        returns = torch.where(batch.response_mask, 1.0, 0.0)
        batch = TrainBatch(**{**batch.__dict__, "returns": returns, "old_values": values})
        losses = [group.train_step(batch)["loss/value"] for _ in range(6)]
        head = dict(group.gather_weights())["score.weight"]
    finally:
        group.shutdown()
        remove_placement_group(pg)
    assert values.shape == batch.response_mask.shape
    assert losses[-1] < 0.5 * losses[0], losses
    assert head.shape[0] == 1

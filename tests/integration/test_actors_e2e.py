"""The four roles together, placed by the cluster plan: vLLM samples, the DeepSpeed learner group (2 ranks,
ZeRO-2) updates, the weights are synced, and vLLM then samples with exactly the learner's logprobs."""

import pytest
import ray
import torch

from actors.learner import LearnerGroup, PolicyLearner
from actors.reference import ReferenceWorker
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from actors.weight_sync import broadcast_weights
from cluster.plan import plan, release, reserve, spawn
from pipeline.algo import grpo_advantages
from pipeline.config import load_config
from pipeline.types import PromptBatch, TrainBatch
from tests.integration.test_rollout_ray import long_prompts

G = 4
_GROUPS = {}


def roles_groups(roles):
    return _GROUPS[id(roles[3])]


TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def roles(local_ray, task_dir):
    cfg = load_config(
        None,
        [
            "learner.num_workers=2",
            "learner.zero_stage=2",
            "learner.lr=0.01",
            "learner.micro_batch_size=8",
            "rollout.max_new_tokens=12",
            f"rollout.kv_cache_memory_bytes={64 * 2**20}",
            "reward.function=pipeline.tasks.synthetic:gold_reward",
        ],
    )
    resource_plan = plan(cfg)
    policy_dir = task_dir / "models/policy"
    groups = reserve(resource_plan)
    roles = resource_plan.roles
    rollout = spawn(RolloutWorker, roles["rollout"], groups, [(cfg.rollout, policy_dir)], {"seed": 0})[0]
    reward = spawn(RewardWorker, roles["reward"], groups, [(cfg.reward,)])[0]
    reference = spawn(
        ReferenceWorker, roles["reference"], groups, [(roles["reference"].settings(cfg.reference), policy_dir)]
    )[0]
    learners = LearnerGroup(
        PolicyLearner,
        roles["learner"].settings(cfg.learner),
        cfg.algo,
        policy_dir,
        seed=0,
        placement_group=groups[roles["learner"].group],
        **roles["learner"].actor_resources(0),
    )
    ray.get([rollout.setup.remote(), reward.setup.remote(), reference.setup.remote()])
    learners.setup()
    _GROUPS[id(learners)] = groups
    yield rollout, reward, reference, learners
    learners.shutdown()
    release(groups)


def test_actors_land_in_their_placement_groups(roles):
    # Every bundle of every role's placement group is taken by the actor planned for it: no group CPU is free,
    # while plain CPUs are (8 logical CPUs for 5 bundles).
    rollout, reward, reference, learners = roles
    groups = roles_groups(roles)
    available = ray.available_resources()
    for name, pg in groups.items():
        assert available.get(f"CPU_group_{pg.id.hex()}", 0.0) == 0.0, name
    assert available.get("CPU", 0.0) >= 3.0


def test_learner_update_then_sync_gives_vllm_the_learners_logprobs(roles, task_dir):
    rollout, reward, reference, learners = roles
    batch = PromptBatch(long_prompts(task_dir, 4), samples_per_prompt=G)

    # step 1. sample, score, reference logprobs: before any update the engine and the learners agree
    sampled = ray.get(rollout.generate.remote(batch))
    scores = ray.get(reward.score.remote(sampled)).scores
    ref_logprobs = ray.get(reference.logprobs.remote(sampled))
    old_logprobs = learners.compute_logprobs(sampled)
    valid = sampled.response_mask
    assert (old_logprobs - sampled.rollout_logprobs)[valid].abs().max() < TOLERANCE
    assert (old_logprobs - ref_logprobs)[valid].abs().max() < TOLERANCE

    assert scores.shape == (len(sampled),) and torch.isfinite(scores).all()

    # step 2. one update on the learners (2 ranks, ZeRO-2). The random-init policy earns gold 0 everywhere, so
    # GRPO advantages from `scores` would all be 0; alternating +1/-1 scores give the update a direction.
    alternating = torch.tensor([1.0, -1.0]).repeat(len(sampled) // 2)
    advantages = grpo_advantages(alternating, group_size=G)[:, None].expand_as(old_logprobs)
    metrics = learners.train_step(
        TrainBatch(
            prompt_ids=sampled.prompt_ids,
            prompt_mask=sampled.prompt_mask,
            response_ids=sampled.response_ids,
            response_mask=valid,
            old_logprobs=old_logprobs,
            advantages=advantages.contiguous(),
            rollout_logprobs=sampled.rollout_logprobs,
        )
    )
    assert metrics["mismatch/logprob_abs_max"] < TOLERANCE
    assert metrics["policy/grad_norm"] > 0

    # step 3. before the sync, fresh samples carry the old policy's logprobs, not the learners'
    stale = ray.get(rollout.generate.remote(batch))
    assert (learners.compute_logprobs(stale) - stale.rollout_logprobs)[stale.response_mask].abs().max() > TOLERANCE

    # step 4. sync (versioned), then fresh samples carry the learners' logprobs
    version = ray.get(rollout.weight_version.remote())
    broadcast_weights(learners.gather_weights(), version + 1, [rollout])
    fresh = ray.get(rollout.generate.remote(batch))
    assert fresh.weight_version == version + 1
    diff = (learners.compute_logprobs(fresh) - fresh.rollout_logprobs)[fresh.response_mask].abs().max()
    assert diff < TOLERANCE, f"max |vLLM - learner| logprob after sync: {diff:.2e}"
    assert torch.isfinite(fresh.rollout_logprobs).all()

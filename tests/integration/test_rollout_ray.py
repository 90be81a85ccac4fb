"""The vLLM RolloutWorker as a Ray actor, and versioned weight sync: after one real optimizer step on the learner's
copy of the policy and `broadcast_weights`, vLLM samples with the learner's logprobs; before it, it does not.

One vLLM actor for the whole module: its engine start (~12-25 s on CPU) is paid once."""

import pytest
import ray
import torch
from transformers import AutoTokenizer

from actors.rollout import RolloutWorker
from actors.sequences import response_logprobs
from actors.weight_sync import broadcast_weights
from pipeline.config import RolloutConfig
from pipeline.types import PromptBatch, Rollouts
from tests.unit.test_rollout import assert_well_formed, model_logprobs, policy, task_prompts

MAX_NEW = 16
TOLERANCE = 1e-3  # fp32 on both sides; what remains is kernel and summation order


@pytest.fixture(scope="module")
def vllm_worker(local_ray, task_dir):
    cfg = RolloutConfig(engine="vllm", max_new_tokens=MAX_NEW, kv_cache_memory_bytes=64 * 2**20)
    actor = ray.remote(num_cpus=1)(RolloutWorker).remote(cfg, task_dir / "models/policy", seed=0)
    ray.get(actor.setup.remote())
    return actor


def mismatch(r: Rollouts, model) -> float:
    """Max abs difference over valid tokens between the engine's logprobs and `model`'s for the same tokens."""
    return (r.rollout_logprobs - model_logprobs(model, r))[r.response_mask].abs().max().item()


def test_vllm_actor_generates_g_samples_per_prompt(vllm_worker, task_dir):
    prompts = task_prompts(task_dir, 4)
    rollouts = ray.get(vllm_worker.generate.remote(PromptBatch(prompts, samples_per_prompt=3)))
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "models/policy")
    assert_well_formed(rollouts, prompts, 3, tokenizer, MAX_NEW)
    assert rollouts.weight_version == ray.get(vllm_worker.weight_version.remote())


def long_prompts(task_dir, n: int) -> list[str]:
    """n prompts of ~145 tokens: longer than one 128-token KV block of vLLM on CPU, so they hit its prefix cache."""
    prompts = task_prompts(task_dir, 64)
    return [" ".join(prompts[i : i + 32]) for i in range(0, 4 * n, 4)]


def test_weight_sync_makes_vllm_sample_with_the_updated_policy(vllm_worker, task_dir):
    batch = PromptBatch(long_prompts(task_dir, 8), samples_per_prompt=4)
    version = ray.get(vllm_worker.weight_version.remote())
    learner = policy(task_dir)  # the learner's copy: the same weights as the engine so far

    # step 1. the engine samples with the learner's logprobs (the comparison is sound before any update)
    sampled = ray.get(vllm_worker.generate.remote(batch))
    assert mismatch(sampled, learner) < TOLERANCE

    # step 2. one real AdamW step on the learner: maximize the logprob of the sampled responses
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-2)
    logprobs = response_logprobs(
        learner, sampled.prompt_ids, sampled.prompt_mask, sampled.response_ids, sampled.response_mask
    )
    (-logprobs[sampled.response_mask].mean()).backward()
    optimizer.step()

    # step 3. before sync, the engine still samples with the old weights
    stale = ray.get(vllm_worker.generate.remote(batch))
    assert stale.weight_version == version
    assert mismatch(stale, learner) > TOLERANCE

    # step 4. after sync, it matches; the same prompts again, so KV blocks cached with the old weights would show
    seconds = broadcast_weights(dict(learner.named_parameters()), version + 1, [vllm_worker])
    assert seconds > 0
    fresh = ray.get(vllm_worker.generate.remote(batch))
    assert fresh.weight_version == version + 1 == ray.get(vllm_worker.weight_version.remote())
    assert mismatch(fresh, learner) < TOLERANCE

"""LoRA RL on the real components: DeepSpeed learners train adapters only, vLLM serves each weight version as a new
LoRA adapter on its base weights (the sync sends the adapter alone), and learner and vLLM logprobs agree at every
step; the learners' base model is the reference; the exported merged policy and adapter give the learner's
logprobs in transformers, peft and a fresh vLLM engine. Llama (the task's policy) and Qwen2 (tied embeddings)."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.learner import LearnerGroup, PolicyLearner
from actors.rollout import RolloutWorker
from actors.sequences import response_logprobs
from actors.weight_sync import broadcast_weights
from pipeline.config import load_config
from pipeline.rl_roles import check_mismatch
from pipeline.types import PromptBatch
from tests.integration.architectures import write_user_model
from tests.integration.test_architectures import TOLERANCE, G, max_diff, update

pytestmark = pytest.mark.slow

CFG = load_config(
    None,
    [
        "learner.lr=0.01",
        "learner.micro_batch_size=8",
        "rollout.max_new_tokens=12",
        f"rollout.kv_cache_memory_bytes={32 * 2**20}",
        "lora.rank=8",
    ],
)


def logprobs_of(model, sampled) -> torch.Tensor:
    with torch.no_grad():
        return response_logprobs(
            model, sampled.prompt_ids, sampled.prompt_mask, sampled.response_ids, sampled.response_mask
        )


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_lora_rl_steps_sync_the_adapter_alone_and_stay_on_policy(local_ray, task_dir, tmp_path, architecture):
    from peft import PeftModel

    model_dir = (
        task_dir / "models/policy"
        if architecture == "llama"
        else write_user_model(task_dir, architecture, tmp_path / "m")
    )
    rollout = ray.remote(num_cpus=1)(RolloutWorker).remote(CFG.rollout, model_dir, seed=0, lora_rank=CFG.lora.rank)
    learners = LearnerGroup(PolicyLearner, CFG.learner, CFG.algo, model_dir, seed=0, lora=CFG.lora)
    try:
        ray.get(rollout.setup.remote())
        learners.setup()
        batch = PromptBatch(["hello there", "write a line", "one two", "the sky is"], samples_per_prompt=G, seed=1)
        full_bytes = sum(t.numel() * t.element_size() for _, t in learners.gather_weights())
        mismatch = []
        for step in (1, 2, 3):
            sampled = ray.get(rollout.generate.remote(batch))
            assert sampled.weight_version == step - 1
            metrics = update(learners, sampled)
            mismatch.append(metrics["mismatch/logprob_abs_max"])
            assert check_mismatch(step, {**metrics, "weight_version": float(step - 1)}, CFG.rollout) is None
            config, tensors = learners.gather_adapter()
            assert tensors and all(".lora_" in name for name, _ in tensors)
            sent = sum(t.numel() * t.element_size() for _, t in tensors)
            assert sent <= 0.1 * full_bytes, (sent, full_bytes)
            broadcast_weights(tensors, step, [rollout], adapter=config)
        after = ray.get(rollout.generate.remote(batch))  # sampled with the third update's adapter
        policy = learners.compute_logprobs(after)
        mismatch.append(max_diff(policy, after))
        assert max(mismatch) <= TOLERANCE, f"{architecture}: |learner - vLLM| logprob per step {mismatch}"

        # the reference: the learners' base model, adapters off, equal to the initial policy; the policy moved
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        reference = ray.get(learners.actors[0].logprobs.remote(after))
        assert torch.allclose(reference, logprobs_of(base, after), atol=1e-5)
        assert (reference - policy)[after.response_mask].abs().max() > 1e-3

        # exports: the merged dir (transformers, a fresh vLLM) and the adapter on the base (peft)
        learners.save_pretrained(tmp_path / "policy", tmp_path / "policy-adapter")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32).eval()
        assert max_diff(logprobs_of(merged, after), after) <= TOLERANCE
        adapted = PeftModel.from_pretrained(base, tmp_path / "policy-adapter").eval()
        assert torch.allclose(logprobs_of(adapted, after), logprobs_of(merged, after), atol=1e-4)
        ray.kill(rollout)
        rollout = ray.remote(num_cpus=1)(RolloutWorker).remote(CFG.rollout, tmp_path / "policy", seed=0)
        fresh = ray.get(rollout.generate.remote(batch))
        assert max_diff(learners.compute_logprobs(fresh), fresh) <= TOLERANCE
    finally:
        learners.shutdown()
        ray.kill(rollout)

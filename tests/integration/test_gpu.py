"""GPU code paths (docs/gpu.md): skipped without a CUDA GPU. On a GPU node these prove what the CPU tests prove
on CPU: vLLM in bf16 with its GPU kernels samples with the learner's weights after every sync, for a tied-head
family (Qwen2) and an untied one (Llama), within the bf16 tolerance the GPU configs use."""

import pytest
import ray

from actors.learner import LearnerGroup, PolicyLearner
from actors.rollout import RolloutWorker
from actors.weight_sync import broadcast_weights
from pipeline.config import load_config
from pipeline.types import PromptBatch
from tests.integration.architectures import write_user_model
from tests.integration.test_architectures import G, chat_prompts, max_diff, update

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

BF16_TOLERANCE = 0.5  # configs/gpu_*.yaml rollout.max_logprob_mismatch; docs/models.md


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_vllm_on_gpu_samples_with_the_gpu_learners_weights_after_each_sync(local_ray, task_dir, tmp_path, architecture):
    cfg = load_config(None, ["learner.lr=0.01", "rollout.max_new_tokens=12", "rollout.gpu_memory_utilization=0.2"])
    model_dir = write_user_model(task_dir, architecture, tmp_path / "model")
    rollout = ray.remote(num_cpus=1, num_gpus=1)(RolloutWorker).remote(cfg.rollout, model_dir, seed=0)
    learners = LearnerGroup(PolicyLearner, cfg.learner, cfg.algo, model_dir, seed=0, num_gpus=1)
    try:
        ray.get(rollout.setup.remote())
        learners.setup()
        batch = PromptBatch(chat_prompts(model_dir, task_dir, tmp_path), samples_per_prompt=G, seed=1)
        for step in (1, 2, 3):
            sampled = ray.get(rollout.generate.remote(batch))
            assert update(learners, sampled)["mismatch/logprob_abs_max"] <= BF16_TOLERANCE
            broadcast_weights(learners.gather_weights(), step, [rollout])
        after = ray.get(rollout.generate.remote(batch))
        assert max_diff(learners.compute_logprobs(after), after) <= BF16_TOLERANCE
    finally:
        learners.shutdown()
        ray.kill(rollout)

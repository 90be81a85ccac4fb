"""Bring your own model: every common architecture, as a tiny random-init model with a chat-template tokenizer and
`messages` prompts, trains 3 RL steps with vLLM rollouts whose logprobs equal the learner's at every step (before
the first weight sync and after each), and exports a policy that transformers and vLLM load with the learner's
logprobs. Tied embeddings (Qwen2, Qwen3, GPT-2, Gemma), qkv bias, fused projections (Phi-3) and Conv1D weights
(GPT-2) must survive the sync. Then the mismatch guard: it fires on a sync with one corrupted tensor."""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.learner import LearnerGroup, PolicyLearner
from actors.rollout import RolloutWorker
from actors.sequences import response_logprobs
from actors.weight_sync import broadcast_weights
from pipeline.algo import grpo_advantages
from pipeline.config import load_config
from pipeline.errors import RunFailure
from pipeline.rl_roles import check_mismatch
from pipeline.tasks.tiny_models import ARCHITECTURES
from pipeline.types import PromptBatch, Rollouts, TrainBatch
from tests.integration.architectures import write_messages_prompts, write_user_model

pytestmark = pytest.mark.slow

G = 4
TOLERANCE = 1e-3  # fp32 on CPU: a correct sync agrees to ~1e-6; the tied-head bug measured 0.03-0.04
CFG = load_config(
    None,
    [
        "learner.lr=0.01",
        "learner.micro_batch_size=8",
        "rollout.max_new_tokens=12",
        f"rollout.kv_cache_memory_bytes={32 * 2**20}",
        "rollout.on_mismatch=error",
        f"rollout.max_logprob_mismatch={TOLERANCE}",
    ],
)


def chat_prompts(model_dir, task_dir, tmp_path, n=4) -> list[str]:
    """The user's `messages` prompts as the data reader renders them: the tokenizer's chat template."""
    import json

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in write_messages_prompts(task_dir, tmp_path / "prompts.jsonl").open()]
    return [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in rows[:n]]


def update(learners: LearnerGroup, sampled: Rollouts) -> dict[str, float]:
    """One GRPO-shaped update on the samples. The random policy earns no reward, so alternating +1/-1 scores give
    the update a direction; old logprobs are the rollout's, as in an on-policy step."""
    alternating = torch.tensor([1.0, -1.0]).repeat(len(sampled) // 2)
    advantages = grpo_advantages(alternating, group_size=G)[:, None].expand_as(sampled.rollout_logprobs)
    return learners.train_step(
        TrainBatch(
            prompt_ids=sampled.prompt_ids,
            prompt_mask=sampled.prompt_mask,
            response_ids=sampled.response_ids,
            response_mask=sampled.response_mask,
            old_logprobs=sampled.rollout_logprobs,
            advantages=advantages.contiguous(),
            rollout_logprobs=sampled.rollout_logprobs,
        )
    )


def max_diff(logprobs: torch.Tensor, sampled: Rollouts) -> float:
    return (logprobs - sampled.rollout_logprobs)[sampled.response_mask].abs().max().item()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_rl_steps_keep_vllm_and_the_learner_on_the_same_weights(local_ray, task_dir, tmp_path, architecture):
    model_dir = write_user_model(task_dir, architecture, tmp_path / "model")
    rollout = ray.remote(num_cpus=1)(RolloutWorker).remote(CFG.rollout, model_dir, seed=0)
    learners = LearnerGroup(PolicyLearner, CFG.learner, CFG.algo, model_dir, seed=0)
    try:
        ray.get(rollout.setup.remote())
        learners.setup()
        batch = PromptBatch(chat_prompts(model_dir, task_dir, tmp_path), samples_per_prompt=G, seed=1)
        mismatch = []
        for step in (1, 2, 3):
            sampled = ray.get(rollout.generate.remote(batch))
            assert sampled.weight_version == step - 1
            metrics = update(learners, sampled)  # measures learner vs rollout logprobs before its update
            mismatch.append(metrics["mismatch/logprob_abs_max"])
            assert check_mismatch(step, {**metrics, "weight_version": float(step - 1)}, CFG.rollout) is None
            broadcast_weights(learners.gather_weights(), step, [rollout])
        after = ray.get(rollout.generate.remote(batch))  # sampled with the third update's weights
        mismatch.append(max_diff(learners.compute_logprobs(after), after))
        assert max(mismatch) <= TOLERANCE, f"{architecture}: |learner - vLLM| logprob per step {mismatch}"

        # the exported policy: transformers and a fresh vLLM engine give the learner's logprobs
        exported = tmp_path / "policy"
        learners.save_pretrained(exported)
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        with torch.no_grad():
            hf = response_logprobs(model, after.prompt_ids, after.prompt_mask, after.response_ids, after.response_mask)
        assert max_diff(hf, after) <= TOLERANCE
        ray.kill(rollout)
        rollout = ray.remote(num_cpus=1)(RolloutWorker).remote(CFG.rollout, exported, seed=0)
        fresh = ray.get(rollout.generate.remote(batch))
        assert max_diff(learners.compute_logprobs(fresh), fresh) <= TOLERANCE
    finally:
        learners.shutdown()
        ray.kill(rollout)


def test_the_mismatch_guard_fires_on_a_sync_with_one_corrupted_tensor(local_ray, task_dir, tmp_path):
    model_dir = write_user_model(task_dir, "qwen2", tmp_path / "model")
    rollout = ray.remote(num_cpus=1)(RolloutWorker).remote(CFG.rollout, model_dir, seed=0)
    learners = LearnerGroup(PolicyLearner, CFG.learner, CFG.algo, model_dir, seed=0)
    try:
        ray.get(rollout.setup.remote())
        learners.setup()
        batch = PromptBatch(chat_prompts(model_dir, task_dir, tmp_path), samples_per_prompt=G, seed=1)
        update(learners, ray.get(rollout.generate.remote(batch)))
        weights = dict(learners.gather_weights())
        name = "model.layers.1.mlp.down_proj.weight"
        weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name])  # the planted bad sync
        broadcast_weights(weights, 1, [rollout])
        sampled = ray.get(rollout.generate.remote(batch))
        metrics = {**update(learners, sampled), "weight_version": 1.0}
        assert metrics["mismatch/logprob_abs_max"] > TOLERANCE
        with pytest.raises(RunFailure, match="rl step 2: .*rollout.on_mismatch=error"):
            check_mismatch(2, metrics, CFG.rollout)
    finally:
        learners.shutdown()
        ray.kill(rollout)


def test_a_qwen2_run_on_messages_prompts_stays_on_policy_until_a_bad_sync_stops_it(
    local_ray, task_dir, tmp_path, monkeypatch
):
    # The user's path end to end (`raylign run` in this process, so the sync can be tampered with): a Qwen2
    # policy, messages prompts in JSONL. Steps 1-3 must agree to 1e-3; the sync after step 3 corrupts one
    # tensor, and with rollout.on_mismatch=error step 4 stops the run naming the step.
    import json

    from pipeline import rl_roles
    from pipeline.run import run
    from tests.conftest import REPO

    model_dir = write_user_model(task_dir, "qwen2", tmp_path / "model")
    prompts = write_messages_prompts(task_dir, tmp_path / "prompts.jsonl")
    real_broadcast = rl_roles.broadcast_weights

    def broadcast_corrupting_sync_3(named_tensors, version, rollout_actors, board=None, adapter=None):
        named_tensors = dict(named_tensors)
        if version == 3:
            name = "model.layers.0.self_attn.q_proj.bias"  # Qwen2's qkv bias
            named_tensors[name] = named_tensors[name] + 0.5
        return real_broadcast(named_tensors, version, rollout_actors, board=board, adapter=adapter)

    monkeypatch.setattr(rl_roles, "broadcast_weights", broadcast_corrupting_sync_3)
    cfg = load_config(
        REPO / "configs/tiny_grpo.yaml",
        [
            "stages=[rl]",
            f"model.policy={model_dir}",
            f"data.prompts={prompts}",
            "run.max_steps=4",
            "rollout.prompts_per_step=4",
            f"rollout.samples_per_prompt={G}",
            "rollout.chunk_size=4",
            "rollout.max_new_tokens=12",
            "run.eval_prompts=4",
            f"run.output_dir={tmp_path / 'runs'}",
            "rollout.on_mismatch=error",
            f"rollout.max_logprob_mismatch={TOLERANCE}",
            f"rollout.kv_cache_memory_bytes={32 * 2**20}",
        ],
    )
    with pytest.raises(RunFailure, match=r"rl step 4: learner and rollout logprobs .* differ by up to"):
        run(cfg, log=lambda _: None)
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "mismatch/logprob_abs_max" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["mismatch/logprob_abs_max"] <= TOLERANCE for r in steps), steps

"""Small evaluations of the offline stages and the `eval` stage, run as Ray tasks: gold reward of policy samples
and DPO's implicit-reward accuracy; and reward models' held-out preference accuracy from their scores. They reuse
the roles' own code paths (the HF rollout engine, the reward-model scorer), so what is measured is what the RL stage
will see."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf import load_frozen_model
from actors.reward import gold_scores
from actors.rollout import RolloutWorker
from actors.sequences import response_logprobs
from actors.training.objectives import pair_sequence_batch
from pipeline.algo import ensemble_mean_std, pair_accuracy, pair_logprobs
from pipeline.config import RolloutConfig
from pipeline.types import PromptBatch

Tensor = torch.Tensor
EVAL_PAIRS = 32  # pairs per forward pass


def sample_gold(
    rollout: RolloutConfig, model_dir: str, prompts: list[str], samples_per_prompt: int, seed: int, gold: str
) -> list[float]:
    """Gold reward of `samples_per_prompt` responses per prompt sampled from `model_dir` with transformers generate
    at temperature 1: [P * G], the G samples of a prompt consecutive."""
    cfg = rollout.model_copy(update={"engine": "hf", "temperature": 1.0, "top_p": 1.0})
    worker = RolloutWorker(cfg, Path(model_dir), seed=seed)
    worker.setup()
    rollouts = worker.generate(PromptBatch(prompts, samples_per_prompt, seed=seed))
    return gold_scores(gold, rollouts.prompts, rollouts.responses)


def preference_accuracy(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """Held-out accuracy of each of K reward models and of their ensemble mean (the reward RL optimizes) from
    their scores of the pairs' chosen and rejected responses ([K, B] each, `heldout.score_pairs`)."""
    members = [pair_accuracy(c, r).item() for c, r in zip(chosen, rejected, strict=True)]
    ensemble = pair_accuracy(ensemble_mean_std(chosen)[0], ensemble_mean_std(rejected)[0]).item()
    return {"member_mean": sum(members) / len(members), "ensemble": ensemble}


def implicit_reward_accuracy(
    policy_dir: str, reference_dir: str, loss_type: str, prompts: list[str], chosen: list[str], rejected: list[str]
) -> float:
    """Held-out accuracy of DPO's implicit reward log pi(y|x) - log pi_ref(y|x) (sequence logprobs as the loss
    took them): the share of pairs it orders as the labels do, ties half."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    margins = []
    for model_dir, sign in ((policy_dir, 1.0), (reference_dir, -1.0)):
        model = load_frozen_model(AutoModelForCausalLM, Path(model_dir))
        device, parts = next(model.parameters()).device, []
        with torch.inference_mode():
            for s in range(0, len(prompts), EVAL_PAIRS):
                rows = slice(s, s + EVAL_PAIRS)
                batch = pair_sequence_batch(tokenizer, prompts[rows], chosen[rows], rejected[rows])
                fields = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
                prompt_ids, prompt_mask, response_ids, response_mask = (t.to(device) for t in fields)
                logprobs = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask).float().cpu()
                c, r = pair_logprobs(logprobs, batch.response_mask, loss_type)
                parts.append(sign * (c - r))
        margins.append(torch.cat(parts))
    margin = margins[0] + margins[1]
    return pair_accuracy(margin, torch.zeros_like(margin)).item()

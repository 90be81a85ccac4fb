"""RolloutWorker with the HF generate backend, as a plain class (no Ray; vLLM is tested in integration)."""

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.rollout import RolloutWorker
from actors.sequences import response_logprobs
from pipeline.config import RolloutConfig
from pipeline.types import PromptBatch, Rollouts, WeightUpdate

MAX_NEW = 12


def task_prompts(task_dir, n: int) -> list[str]:
    return pq.read_table(task_dir / "prompts.parquet").column("prompt").to_pylist()[:n]


def hf_worker(task_dir, **cfg) -> RolloutWorker:
    worker = RolloutWorker(
        RolloutConfig(engine="hf", max_new_tokens=MAX_NEW, **cfg), task_dir / "models/policy", seed=0
    )
    worker.setup()
    return worker


def policy(task_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(task_dir / "models/policy").eval()


def model_logprobs(model, r: Rollouts) -> torch.Tensor:
    with torch.no_grad():
        return response_logprobs(model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)


def assert_well_formed(r: Rollouts, prompts: list[str], g: int, tokenizer, max_new_tokens: int) -> None:
    """Shapes, padding, masks, finish reasons and texts of P * G rollouts; used by the integration tests too."""
    b = len(prompts) * g
    assert len(r) == b and r.group_size == g
    assert r.prompts == [p for p in prompts for _ in range(g)]
    tp, t = r.prompt_ids.shape[1], r.response_ids.shape[1]
    assert r.prompt_ids.shape == r.prompt_mask.shape == (b, tp) and r.prompt_ids.dtype == torch.long
    assert r.response_ids.shape == r.response_mask.shape == r.rollout_logprobs.shape == (b, t)
    assert r.prompt_mask.dtype == r.response_mask.dtype == torch.bool
    assert r.response_ids.dtype == torch.long and r.rollout_logprobs.dtype == torch.float32
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert (r.prompt_ids[~r.prompt_mask] == pad).all() and (r.response_ids[~r.response_mask] == pad).all()
    assert (r.rollout_logprobs[~r.response_mask] == 0).all()
    valid = r.rollout_logprobs[r.response_mask]
    assert torch.isfinite(valid).all() and (valid <= 0).all()
    assert t <= max_new_tokens
    for i in range(b):
        prompt = r.prompt_ids[i, r.prompt_mask[i]].tolist()
        assert r.prompt_mask[i, tp - len(prompt) :].all(), "prompt padding must be on the left"
        assert prompt == tokenizer(r.prompts[i]).input_ids and prompt[0] == tokenizer.bos_token_id
        n = int(r.response_mask[i].sum())
        assert n >= 1 and r.response_mask[i, :n].all(), "response padding must be on the right"
        ids = r.response_ids[i, :n].tolist()
        assert eos not in ids[:-1], "nothing is sampled after EOS"
        if r.finish_reasons[i] == "stop":
            assert ids[-1] == eos
        else:
            assert r.finish_reasons[i] == "length" and n == max_new_tokens and ids[-1] != eos
        assert r.responses[i] == tokenizer.decode(ids, skip_special_tokens=True)


def stop_prone_lm_head(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """lm_head weights whose EOS row points along the mean final hidden state, so EOS gets a logit of ~6 and
    responses often stop early: a weight change whose effect on samples is plain to see."""
    with torch.no_grad():
        hidden = [model.model(torch.tensor([tokenizer(p).input_ids])).last_hidden_state[0] for p in prompts]
        mean = torch.cat(hidden).mean(dim=0)
    weight = model.lm_head.weight.detach().clone()
    weight[tokenizer.eos_token_id] = mean * (6.0 / mean.dot(mean))
    return weight


def test_generates_g_samples_per_prompt_with_valid_padding(task_dir):
    prompts = task_prompts(task_dir, 4)
    rollouts = hf_worker(task_dir).generate(PromptBatch(prompts, samples_per_prompt=3))
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "models/policy")
    assert_well_formed(rollouts, prompts, 3, tokenizer, MAX_NEW)
    assert rollouts.weight_version == 0


def test_rollout_logprobs_equal_the_models_logprobs_at_temperature_1(task_dir):
    rollouts = hf_worker(task_dir, temperature=1.0).generate(PromptBatch(task_prompts(task_dir, 4), 3))
    expected = model_logprobs(policy(task_dir), rollouts)
    assert (rollouts.rollout_logprobs - expected).abs().max() < 1e-4


def test_greedy_is_deterministic(task_dir):
    worker = hf_worker(task_dir, temperature=0.0)
    batch = PromptBatch(task_prompts(task_dir, 2), samples_per_prompt=2)
    first, second = worker.generate(batch), worker.generate(batch)
    assert torch.equal(first.response_ids, second.response_ids)
    assert torch.equal(first.response_ids[0], first.response_ids[1]), "greedy samples of one prompt are equal"


def test_load_weights_changes_samples_and_bumps_the_version(task_dir):
    prompts = task_prompts(task_dir, 6)
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "models/policy")
    worker, original = hf_worker(task_dir), policy(task_dir)
    before = worker.generate(PromptBatch(prompts, 4))
    assert before.weight_version == 0 and before.finish_reasons.count("stop") <= 2

    updated = policy(task_dir)
    lm_head = stop_prone_lm_head(updated, tokenizer, prompts)
    updated.lm_head.weight.data.copy_(lm_head)
    worker.load_weights(WeightUpdate(version=3, named_tensors={"lm_head.weight": lm_head}))
    assert worker.weight_version() == 3

    after = worker.generate(PromptBatch(prompts, 4))
    assert after.weight_version == 3
    assert_well_formed(after, prompts, 4, tokenizer, MAX_NEW)
    assert after.finish_reasons.count("stop") >= len(after) // 2, after.finish_reasons
    assert (after.rollout_logprobs - model_logprobs(updated, after)).abs().max() < 1e-4
    assert (after.rollout_logprobs - model_logprobs(original, after)).abs().max() > 1e-1

    with pytest.raises(ValueError, match="older"):
        worker.load_weights(WeightUpdate(version=2, named_tensors={"lm_head.weight": lm_head}))
    with pytest.raises(ValueError, match="unknown"):
        worker.load_weights(WeightUpdate(version=4, named_tensors={"no.such.weight": lm_head}))

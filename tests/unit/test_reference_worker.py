"""ReferenceWorker as a plain class: logprobs equal actors.sequences.response_logprobs, and padding never
changes a logprob."""

import dataclasses
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.reference import ReferenceWorker
from actors.sequences import response_logprobs
from pipeline.batches import pad_left, pad_right
from pipeline.config import ReferenceConfig
from pipeline.tasks.language import sample_prompt, sample_response
from pipeline.types import Rollouts


def sample_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n (prompt, response) pairs of the synthetic language, of mixed lengths."""
    rng = random.Random(seed)
    prompts = [sample_prompt(rng) for _ in range(n)]
    return prompts, [sample_response(rng, p, quality=rng.random()) for p in prompts]


def rollouts_of(tokenizer, prompts: list[str], responses: list[str]) -> Rollouts:
    """Rollouts built by hand: prompts with BOS, responses ending in EOS, logprobs left at 0."""
    prompt_rows = [tokenizer(p)["input_ids"] for p in prompts]
    response_rows = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    prompt_ids, prompt_mask = pad_left(prompt_rows, tokenizer.pad_token_id)
    response_ids, response_mask = pad_right(response_rows, tokenizer.pad_token_id, torch.long)
    return Rollouts(
        prompts=list(prompts),
        responses=list(responses),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(response_ids.shape),
        finish_reasons=["stop"] * len(prompts),
        weight_version=0,
        group_size=1,
    )


@pytest.fixture(scope="module")
def policy_dir(task_dir):
    return task_dir / "models/policy"


@pytest.fixture(scope="module")
def rollouts(policy_dir):
    return rollouts_of(AutoTokenizer.from_pretrained(policy_dir), *sample_texts(7))


@pytest.fixture(scope="module")
def worker(policy_dir):
    # micro-batches of 3 over 7 rows: a short last micro-batch, and trimmed padding in each
    w = ReferenceWorker(ReferenceConfig(micro_batch_size=3), policy_dir)
    w.setup()
    return w


def test_logprobs_equal_response_logprobs_of_the_model(worker, rollouts, policy_dir):
    got = worker.logprobs(rollouts)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    with torch.no_grad():
        want = response_logprobs(
            model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, rollouts.response_mask
        )
    assert got.dtype == torch.float32 and got.shape == rollouts.response_ids.shape
    assert (rollouts.prompt_mask.sum(1).unique().numel() > 1) and (rollouts.response_mask.sum(1).unique().numel() > 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[~rollouts.response_mask] == 0).all()
    assert (got[rollouts.response_mask] < 0).all()


def test_padding_never_changes_a_logprob(worker, rollouts, policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    batch = worker.logprobs(rollouts)
    for i in range(len(rollouts)):
        alone = rollouts_of(tokenizer, rollouts.prompts[i : i + 1], rollouts.responses[i : i + 1])
        assert not alone.prompt_mask.logical_not().any()  # one row: no padding at all
        t = alone.response_ids.shape[1]
        torch.testing.assert_close(batch[i, :t], worker.logprobs(alone)[0], atol=1e-5, rtol=0)
    # more left padding on every prompt, more right padding on every response
    pad_ids = torch.full((len(rollouts), 3), 5)  # any id: these columns are masked out
    pad_mask = torch.zeros((len(rollouts), 3), dtype=torch.bool)
    wider = dataclasses.replace(
        rollouts,
        prompt_ids=torch.cat([pad_ids, rollouts.prompt_ids], 1),
        prompt_mask=torch.cat([pad_mask, rollouts.prompt_mask], 1),
        response_ids=torch.cat([rollouts.response_ids, pad_ids], 1),
        response_mask=torch.cat([rollouts.response_mask, pad_mask], 1),
    )
    torch.testing.assert_close(worker.logprobs(wider)[:, : batch.shape[1]], batch, atol=1e-5, rtol=0)


def test_reference_is_frozen(worker):
    assert not worker.model.training
    assert not any(p.requires_grad for p in worker.model.parameters())
    assert next(worker.model.parameters()).dtype == torch.float32  # CPU: fp32


def test_logprobs_before_setup_sets_up_first(policy_dir, rollouts):
    # what a worker Ray restarted after a crash does: its first call finds no model and loads it
    fresh = ReferenceWorker(ReferenceConfig(), policy_dir)
    ready = ReferenceWorker(ReferenceConfig(), policy_dir)
    ready.setup()
    assert torch.equal(fresh.logprobs(rollouts), ready.logprobs(rollouts))

"""Padding-free (packed) forwards and token-budget micro-batches (actors/sequences.py): packed logprobs, values,
losses and gradients equal padded ones for several architectures; a hand-computed packing layout; budget plans
cover every sequence once and give the same update as fixed-size micro-batches."""

import logging
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from actors.learner import PolicyLearner
from actors.sequences import (
    LAYOUTS,
    balanced_shards,
    choose_layout,
    lengths_of,
    micro_batches,
    pack,
    packed_layout,
    packed_tokens,
    padded_tokens,
    split_to,
)
from actors.training.update import mean_metrics
from cluster.local import free_port
from pipeline.algo import ppo_policy_loss, value_loss
from pipeline.batches import pad_left, pad_right
from pipeline.config import AlgoConfig, KLConfig, LearnerConfig
from pipeline.tasks.tiny_models import build_causal_lm
from pipeline.types import TrainBatch

ARCHS = ["llama", "qwen2", "gpt2"]
PADDED = LAYOUTS["padded"]


@pytest.fixture(scope="module")
def tokenizer(task_dir):
    return AutoTokenizer.from_pretrained(task_dir / "models/policy")


def mixed_batch(n: int, *, vocab: int, seed: int) -> TrainBatch:
    """n sequences: prompts of 1-9 tokens, responses of 0-12 (one empty, one of a single token), random
    advantages, old logprobs near -log(vocab)."""
    g = random.Random(seed)
    response_lengths = [0, 1] + [g.randint(1, 12) for _ in range(n - 2)]
    prompts, p_mask = pad_left([[g.randrange(3, vocab) for _ in range(g.randint(1, 9))] for _ in range(n)], 0)
    responses, r_mask = pad_right([[g.randrange(3, vocab) for _ in range(k)] for k in response_lengths], 0, torch.long)
    noise = torch.randn(r_mask.shape, generator=torch.Generator().manual_seed(seed))
    old = torch.where(r_mask, -torch.log(torch.tensor(float(vocab))) + 0.1 * noise, 0.0)
    advantages = torch.where(r_mask, noise.roll(1, dims=1), 0.0)
    return TrainBatch(prompts, p_mask, responses, r_mask, old_logprobs=old, advantages=advantages)


def fields(b):
    return b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logprobs_losses_and_gradients_equal_padded(arch, tokenizer):
    model = build_causal_lm(arch, tokenizer, hidden_size=128, layers=2, seed=0)
    model.eval()  # GPT-2's dropout off, as in the learners (from_pretrained)
    batch = mixed_batch(9, vocab=len(tokenizer), seed=1)
    packed = packed_layout(model)
    assert packed.outputs.keywords == {"keep_logits": True}  # the head runs on the predicting positions only
    results = {}
    for layout in (PADDED, packed):
        logprobs = layout.logprobs(model, *fields(batch))
        loss, _ = ppo_policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, clip_low=0.2, clip_high=0.2
        )
        loss.backward()
        results[layout.name] = logprobs.detach(), loss.detach(), grads(model)
    (lp_pad, loss_pad, g_pad), (lp_pack, loss_pack, g_pack) = results["padded"], results["packed"]
    assert (lp_pack[~batch.response_mask] == 0).all() and (lp_pack[batch.response_mask] < 0).all()
    torch.testing.assert_close(lp_pack, lp_pad, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-5, rtol=0)
    assert_same_grads(g_pack, g_pad)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_critic_values_and_gradients_equal_padded(arch, tokenizer):
    config = build_causal_lm(arch, tokenizer, hidden_size=128, layers=2, seed=0).config
    config.num_labels = 1  # the critic's value head (actors/critic.py)
    torch.manual_seed(0)
    critic = AutoModelForTokenClassification.from_config(config).eval()
    batch = mixed_batch(9, vocab=len(tokenizer), seed=2)
    returns = torch.where(batch.response_mask, batch.advantages, 0.0)
    packed = packed_layout(critic)
    assert packed.outputs.keywords == {"keep_logits": False}  # a token-classification head takes no logits_to_keep
    results = {}
    for layout in (PADDED, packed):
        values = layout.values(critic, *fields(batch))
        loss, _ = value_loss(values, torch.zeros_like(values), returns, batch.response_mask, clip=0.2)
        loss.backward()
        results[layout.name] = values.detach(), grads(critic)
    torch.testing.assert_close(results["packed"][0], results["padded"][0], atol=1e-5, rtol=0)
    assert (results["packed"][0][~batch.response_mask] == 0).all()
    assert_same_grads(results["packed"][1], results["padded"][1])


def hand_batch():
    """A: prompt [5, 6], response [8]; B: prompt [11, 12], no response; C: prompt [7], response [9, 10]."""
    prompt_ids, prompt_mask = pad_left([[5, 6], [11, 12], [7]], 0)
    response_ids, response_mask = pad_right([[8], [], [9, 10]], 0, torch.long)
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_packing_layout_by_hand():
    p = pack(*hand_batch())
    # B has nothing to read back, so it is left out: row A (5 6 8) then C (7 9 10), positions restart at 0.
    assert p.input_ids.tolist() == [[5, 6, 8, 7, 9, 10]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    # Response token 8 (row index 2) is predicted by index 1; 9 (index 4) by 3; 10 (index 5) by 4.
    assert p.predictors.tolist() == [1, 3, 4]

    def row_index(*, input_ids, position_ids, attention_mask, use_cache):
        assert attention_mask is None and use_cache is False  # what makes transformers read the packing
        return SimpleNamespace(logits=torch.arange(input_ids.shape[1], dtype=torch.float32)[None, :, None])

    # A model whose output is its row index: each response token gets the index of the output that predicts it.
    values = LAYOUTS["packed"].values(row_index, *hand_batch())
    assert values.tolist() == [[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]]
    lengths = lengths_of(hand_batch()[1], hand_batch()[3])
    assert lengths.tolist() == [[2, 1], [2, 0], [1, 2]]
    assert packed_tokens(lengths) == 6  # 3 + 3; B is not computed
    assert padded_tokens(lengths) == 12  # 3 rows x (2 prompt + 2 response columns)


def test_a_micro_batch_without_response_tokens_still_runs_a_forward(tokenizer):
    model = build_causal_lm("llama", tokenizer, hidden_size=128, layers=2, seed=0).eval()
    prompt_ids, prompt_mask, response_ids, response_mask = (t[1:2] for t in hand_batch())  # B alone
    logprobs = packed_layout(model).logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    assert logprobs.tolist() == [[0.0, 0.0]] and logprobs.requires_grad  # a loss of it can go backward
    assert packed_tokens(lengths_of(prompt_mask, response_mask)) == 1 * (2 + 1)  # computed as a padded row


def test_a_sequence_with_a_response_needs_a_prompt_token():
    with pytest.raises(ValueError, match="empty prompt"):
        pack(
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.bool),
            torch.ones(1, 2, dtype=torch.long),
            torch.ones(1, 2, dtype=torch.bool),
        )


def test_token_budget_fills_longest_first_by_hand():
    lengths = torch.tensor([[2, 1], [5, 3], [1, 1], [3, 3], [2, 2]])  # 3, 8, 2, 6, 4 tokens
    # Longest first, first fit within 10: 8 | 6 | 6+4 | 3 (fits nowhere) | 8+2.
    plan = micro_batches(lengths, rows=2, max_tokens=10, tokens=packed_tokens)
    assert [idx.tolist() for idx in plan] == [[1, 2], [3, 4], [0]]
    assert [idx.tolist() for idx in micro_batches(lengths, rows=2, max_tokens=None, tokens=packed_tokens)] == [
        [0, 1],
        [2, 3],
        [4],
    ]
    # Padded, a micro-batch costs rows x (longest prompt + longest response): 8 | 6 | 3 (6,4: 2x(3+3)=12) ...
    plan = micro_batches(lengths, rows=2, max_tokens=10, tokens=padded_tokens)
    assert all(padded_tokens(lengths[idx]) <= 10 for idx in plan)


@pytest.mark.parametrize("tokens", [packed_tokens, padded_tokens])
def test_token_budget_micro_batches_cover_every_sequence_once(tokens):
    g = torch.Generator().manual_seed(3)
    for budget in (1, 7, 20, 64, 10_000):
        lengths = torch.stack([torch.randint(1, 9, (37,), generator=g), torch.randint(0, 13, (37,), generator=g)], 1)
        plan = micro_batches(lengths, rows=4, max_tokens=budget, tokens=tokens)
        assert sorted(torch.cat(plan).tolist()) == list(range(37))
        assert all(len(idx) == 1 or tokens(lengths[idx]) <= budget for idx in plan)
        count = min(len(plan) + 5, 37)
        more = split_to(plan, count, lengths, tokens)  # what a rank with fewer micro-batches does
        assert len(more) == count and sorted(torch.cat(more).tolist()) == list(range(37))
    with pytest.raises(ValueError, match="cannot fill"):
        split_to(plan, 38, lengths, tokens)


def test_balanced_shards_are_equal_in_size_and_even_in_tokens():
    lengths = torch.tensor([30, 28, 1, 2, 3, 3, 2, 25])
    shards = balanced_shards(lengths, 2)
    assert [len(s) for s in shards] == [4, 4] and sorted(torch.cat(shards).tolist()) == list(range(8))
    # Contiguous halves hold 61 and 33 tokens. Four sequences each, one shard must take two of 30, 28, 25: the
    # best split is 28 + 25 + 2 + 1 = 56 against 38.
    assert sorted(int(lengths[s].sum()) for s in shards) == [38, 56]
    with pytest.raises(ValueError, match="equal learner shards"):
        balanced_shards(lengths, 3)


def test_token_counts_add_up_over_ranks():
    ranks = [
        {"tokens/real": 10.0, "tokens/computed": 12.0, "loss/policy": 1.0, "mismatch/logprob_abs_max": 0.1},
        {"tokens/real": 20.0, "tokens/computed": 20.0, "loss/policy": 3.0, "mismatch/logprob_abs_max": 0.3},
    ]
    assert mean_metrics(ranks) == {
        "tokens/real": 30.0,
        "tokens/computed": 32.0,
        "loss/policy": 2.0,
        "mismatch/logprob_abs_max": 0.3,
    }


def test_a_model_that_cannot_take_packed_positions_falls_back_with_one_log_line(tokenizer, caplog):
    model = build_causal_lm("llama", tokenizer, hidden_size=128, layers=2, seed=0).eval()

    def masked(**kwargs):  # an attention given a full mask: the packed sequences would see each other
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        return model(**kwargs)

    with caplog.at_level(logging.WARNING, logger="actors.sequences"):
        assert choose_layout(masked, model, torch.device("cpu"), True, who="learner") is PADDED
        assert choose_layout(model, model, torch.device("cpu"), False, who="learner") is PADDED  # off: no check
        assert choose_layout(model, model, torch.device("cpu"), True, who="learner").name == "packed"
    assert len(caplog.records) == 1
    assert "learner: padded forwards instead of packed: LlamaForCausalLM packed and padded outputs differ" in (
        caplog.records[0].getMessage()
    )


def updated_weights(task_dir, batch: TrainBatch, **cfg) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Weights after one torch-engine update on batch, and its metrics. adam_eps = 1 keeps Adam's first step
    linear in the gradient (lr * g / (|g| + 1)), so a micro-batch weighted wrongly would show."""
    algo = AlgoConfig(kl=KLConfig(coef=0.5, estimator="k3", mode="loss"), clip_low=0.1, clip_high=0.1)
    learner_cfg = LearnerConfig(backend="torch", lr=1e-2, adam_eps=1.0, grad_clip=1e6, **cfg)
    lrn = PolicyLearner(learner_cfg, algo, task_dir / "models/policy", master_port=free_port())
    lrn.setup()
    metrics = lrn.train_step(batch)
    return {n: p.detach().clone() for n, p in lrn.engine.module.named_parameters()}, metrics


def test_token_budget_and_packing_give_the_same_update_as_fixed_padded_micro_batches(task_dir, tokenizer):
    batch = mixed_batch(12, vocab=300, seed=4)
    ref = torch.where(batch.response_mask, batch.old_logprobs + 0.05, 0.0)
    batch = TrainBatch(**{**batch.__dict__, "ref_logprobs": ref, "rollout_logprobs": batch.old_logprobs})
    runs = {
        "fixed padded": updated_weights(task_dir, batch, micro_batch_size=5, packing=False),
        "fixed packed": updated_weights(task_dir, batch, micro_batch_size=5),
        "budget packed": updated_weights(task_dir, batch, max_tokens_per_micro_batch=24),
        "budget padded": updated_weights(task_dir, batch, max_tokens_per_micro_batch=40, packing=False),
    }
    want, want_m = runs["fixed padded"]
    lengths = lengths_of(batch.prompt_mask, batch.response_mask)
    real = int(lengths.sum())
    for name, (weights, m) in runs.items():
        for n in want:
            torch.testing.assert_close(weights[n], want[n], atol=1e-6, rtol=1e-5, msg=f"{name}: {n}")
        for key in ("loss/policy", "loss/kl", "loss/total", "mismatch/logprob_abs_max", "policy/grad_norm"):
            assert m[key] == pytest.approx(want_m[key], abs=1e-5), (name, key)
        assert m["tokens/real"] == real
    assert runs["fixed packed"][1]["tokens/computed"] == real - int(lengths[lengths[:, 1] == 0].sum())
    assert runs["fixed padded"][1]["tokens/computed"] > real
    assert runs["budget padded"][1]["tokens/computed"] < runs["fixed padded"][1]["tokens/computed"]
    initial = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy").state_dict()
    assert max((want[n] - initial[n]).abs().max().item() for n in want) > 1e-3  # far above the tolerance

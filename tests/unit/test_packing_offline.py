"""Padding-free forwards and token-budget micro-batches of reward-model scoring (actors/scoring.py) and the offline
stages (actors/training/offline.py): packed reward scores, Bradley-Terry, SFT and DPO losses and their gradients equal
the padded ones for several architectures; budget plans keep pairs together, cover every row once and give the same
update as fixed-size padded micro-batches; a model that fails the scoring probe falls back with one log line."""

import logging
import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import actors.scoring
from actors.reward import ModelScorer
from actors.scoring import (
    SCORE_LAYOUTS,
    choose_score_layout,
    packed_reward_scores,
    packed_row_tokens,
    packed_rows,
    reward_model_scores,
    scored_positions,
)
from actors.training.engine import TorchEngine
from actors.training.objectives import (
    PAIR_AGG,
    ScoreBatch,
    SequenceBatch,
    dpo_objective,
    score_objective,
    sft_objective,
)
from actors.training.offline import offline_plan, offline_update
from pipeline.algo import bt_loss
from pipeline.batches import pad_left, pad_right
from pipeline.config import DpoConfig, LearnerConfig
from pipeline.tasks.tiny_models import build_causal_lm
from tests.unit.test_packing import assert_same_grads, grads

ARCHS = ["llama", "qwen2", "gpt2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(task_dir):
    return AutoTokenizer.from_pretrained(task_dir / "models/policy")


def reward_model(arch: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    config = build_causal_lm(arch, tokenizer, hidden_size=128, layers=2, seed=seed).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()  # GPT-2's dropout off, as from_pretrained


def score_batch_of(n_pairs: int, *, pad: int, vocab: int, seed: int, side: str = "left") -> ScoreBatch:
    """2 * n_pairs rows of 2-30 tokens (no pad ids inside), padded on `side`, pairs interleaved."""
    g = random.Random(seed)
    rows = [
        [g.choice([t for t in range(3, vocab) if t != pad]) for _ in range(g.randint(2, 30))]
        for _ in range(2 * n_pairs)
    ]
    if side == "left":
        ids, mask = pad_left(rows, pad)
    else:
        ids, mask = pad_right(rows, pad, torch.long)
    return ScoreBatch(ids, mask.long())


def sequence_batch_of(n: int, *, vocab: int, seed: int) -> SequenceBatch:
    """n sequences: prompts of 1-9 tokens, responses of 1-14 (each ends with a token, as EOS does)."""
    g = random.Random(seed)
    prompts, p_mask = pad_left([[g.randrange(3, vocab) for _ in range(g.randint(1, 9))] for _ in range(n)], 0)
    responses, r_mask = pad_right(
        [[g.randrange(3, vocab) for _ in range(g.randint(1, 14))] for _ in range(n)], 0, torch.long
    )
    return SequenceBatch(prompts, p_mask, responses, r_mask)


def engine_of(model: torch.nn.Module, **cfg) -> TorchEngine:
    """adam_eps = 1 keeps Adam's first step linear in the gradient, so a micro-batch weighted wrongly would show."""
    return TorchEngine(LearnerConfig(backend="torch", lr=1e-2, adam_eps=1.0, grad_clip=1e6, **cfg), model, 0, 1)


def one_loss(goal, batch) -> tuple[torch.Tensor, dict]:
    loss, m = goal.loss(0, batch)
    loss.backward()
    return loss.detach(), m


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_reward_scores_bt_loss_and_gradients_equal_padded(arch, side, tokenizer):
    model = reward_model(arch, tokenizer)
    batch = score_batch_of(7, pad=model.config.pad_token_id, vocab=len(tokenizer), seed=1, side=side)
    forwards = {
        "padded": reward_model_scores,
        "packed, one row": partial(packed_reward_scores, row_tokens=10_000),
        "packed, rows of 40": partial(packed_reward_scores, row_tokens=40),  # several rows, filler at their ends
        "packed, a row each": partial(packed_reward_scores, row_tokens=1),
    }
    results = {}
    for name, forward in forwards.items():
        scores = forward(model, batch.input_ids, batch.attention_mask)
        loss, _ = bt_loss(scores[0::2], scores[1::2])
        loss.backward()
        results[name] = scores.detach(), loss.detach(), grads(model)
    s_pad, l_pad, g_pad = results["padded"]
    assert s_pad.std() > 0  # the scores tell the rows apart, so a mix-up would show
    alone = torch.cat(
        [
            reward_model_scores(model, batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1])
            for i in range(len(batch))
        ]
    )  # each row scored alone, without any padding
    torch.testing.assert_close(s_pad, alone.detach(), atol=1e-5, rtol=0)
    for name, (scores, loss, g) in results.items():
        torch.testing.assert_close(scores, s_pad, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(loss, l_pad, atol=1e-5, rtol=0, msg=name)
        assert_same_grads(g, g_pad)
    # the stage's objective takes the same path
    engine = SimpleNamespace(model=model, module=model, device=CPU)
    for packing in (False, True):
        loss, _ = one_loss(score_objective(engine, packing, "bt", who="rm", quiet=False), batch)
        torch.testing.assert_close(loss, l_pad, atol=1e-5, rtol=0)
        assert_same_grads(grads(model), g_pad)


def test_packed_scores_read_the_wrapped_model_of_an_engine(tokenizer):
    model = reward_model("llama", tokenizer)

    class Engine(torch.nn.Module):  # as DeepSpeed's engine: the model as `.module`, a `config` of its own
        def __init__(self):
            super().__init__()
            self.module, self.config = model, {"zero_optimization": {"stage": 2}}

        def forward(self, **kwargs):
            return self.module(**kwargs)

    batch = score_batch_of(3, pad=model.config.pad_token_id, vocab=len(tokenizer), seed=6)
    engine = Engine()
    assert choose_score_layout(engine, model, CPU, True, who="rm") is SCORE_LAYOUTS["packed"]
    torch.testing.assert_close(
        packed_reward_scores(engine, batch.input_ids, batch.attention_mask),
        reward_model_scores(engine, batch.input_ids, batch.attention_mask),
        atol=1e-5,
        rtol=0,
    )


def test_packed_rows_by_hand():
    lengths = torch.tensor([5, 2, 7, 3, 1])
    # First fit decreasing into rows of 8: 7 | 5 | 7+1 | 5+3 | 2 fits nowhere.
    assert [r.tolist() for r in packed_rows(lengths, 8)] == [[2, 4], [0, 3], [1]]
    assert packed_row_tokens(lengths, 8) == 3 * 8  # 3 rows as wide as the fullest (8)
    assert packed_row_tokens(lengths, 100) == 18  # one row: the real tokens only
    assert [r.tolist() for r in packed_rows(torch.tensor([9, 2]), 4)] == [[0], [1]]  # longer than a row: its own

    def row_index(*, input_ids, position_ids, attention_mask, use_cache):
        assert attention_mask is None and use_cache is False  # what makes transformers read the packing
        seen.append((input_ids.tolist(), position_ids.tolist()))
        return (torch.arange(input_ids.numel(), dtype=torch.float32).reshape(*input_ids.shape, 1),)

    seen = []
    model = SimpleNamespace(score=torch.nn.Identity(), base_model=row_index, config=SimpleNamespace(pad_token_id=0))
    ids = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 0, 8, 9], [1, 2, 3, 4, 5]])  # A: 5 6 7, B: 8 9, C: 1 2 3 4 5
    mask = (ids != 0).long()
    scores = packed_reward_scores(model, ids, mask, row_tokens=5)
    # Rows of 5, longest first: C | A + B, no filler. The model's output at each token is its flat index.
    assert seen == [([[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]], [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]])]
    assert scores.tolist() == [7.0, 9.0, 4.0]  # the last token of A (row 1, col 2), B (1, 4), C (0, 4)
    seen.clear()
    packed_reward_scores(model, ids[:2], mask[:2], row_tokens=3)  # A | B + a filler block
    assert seen == [([[5, 6, 7], [8, 9, 0]], [[0, 1, 2], [0, 1, 0]])]


def test_the_scored_token_is_the_rightmost_that_is_not_padding_by_hand():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0], [4, 0, 1, 0]])  # pad id 0
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    # transformers' rule: the rightmost non-pad id, so row 2's inner pad id (a real token) is skipped over.
    assert scored_positions(ids, mask, 0).tolist() == [3, 2, 2]
    assert scored_positions(ids, mask, None).tolist() == [3, 2, 2]  # no pad id: the last real token


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_sft_and_dpo_losses_and_gradients_equal_padded(arch, tokenizer):
    policy = build_causal_lm(arch, tokenizer, hidden_size=128, layers=2, seed=0).eval()
    reference = build_causal_lm(arch, tokenizer, hidden_size=128, layers=2, seed=1).eval().requires_grad_(False)
    engine = SimpleNamespace(model=policy, module=policy, device=CPU)
    batch = sequence_batch_of(10, vocab=len(tokenizer), seed=2)  # 5 interleaved pairs for DPO
    for make in (
        lambda p: sft_objective(engine, p, quiet=False),
        lambda p: dpo_objective(engine, reference, DpoConfig(beta=0.5), p, quiet=False),
    ):
        (l_pad, m_pad), g_pad = one_loss(make(False), batch), grads(policy)
        (l_pack, m_pack), g_pack = one_loss(make(True), batch), grads(policy)
        assert l_pad.item() > 0
        torch.testing.assert_close(l_pack, l_pad, atol=1e-5, rtol=0)
        assert m_pack.keys() == m_pad.keys()
        assert_same_grads(g_pack, g_pad)


def test_offline_plans_keep_pairs_together_and_cover_every_row_once():
    g = torch.Generator().manual_seed(5)
    lengths = torch.stack([torch.randint(1, 9, (40,), generator=g), torch.randint(1, 13, (40,), generator=g)], 1)
    packed = lambda x: int(x.sum())  # noqa: E731
    for budget in (None, 1, 20, 64, 10_000):
        cfg = LearnerConfig(micro_batch_size=6, max_tokens_per_micro_batch=budget)
        plan = offline_plan(lengths, cfg, packed, 1, CPU, group=2)
        assert sorted(torch.cat(plan).tolist()) == list(range(40))
        for idx in plan:
            assert (idx[0::2] % 2 == 0).all() and (idx[1::2] == idx[0::2] + 1).all()  # (2i, 2i+1) side by side
            assert budget is None or len(idx) == 2 or packed(lengths[idx]) <= budget
        if budget is None:
            assert [len(idx) for idx in plan] == [6] * 6 + [4]  # 3 pairs each, in order
    plan = offline_plan(
        lengths[:, :1], LearnerConfig(micro_batch_size=4, max_tokens_per_micro_batch=9), packed, 1, CPU, group=1
    )
    assert sorted(torch.cat(plan).tolist()) == list(range(40)) and len(plan) > 1


def updated(model_fn, goal_fn, batch, *, agg: str, group: int, **cfg):
    model = model_fn()
    engine = engine_of(model, **cfg)
    m = offline_update(engine, batch, goal_fn(engine, cfg.get("packing", True)), engine.cfg, 1, agg=agg, group=group)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, m


RUNS = {  # learner settings: the padded fixed-size run first, the one the others must equal
    "fixed padded": {"micro_batch_size": 4, "packing": False},
    "fixed packed": {"micro_batch_size": 4},
    "budget packed": {"max_tokens_per_micro_batch": 90},
    "budget padded": {"max_tokens_per_micro_batch": 120, "packing": False},
}


@pytest.mark.parametrize("stage", ["rm", "sft", "dpo"])
def test_token_budget_and_packing_give_the_same_offline_update(stage, tokenizer):
    vocab = len(tokenizer)
    if stage == "rm":
        model_fn = lambda: reward_model("llama", tokenizer)  # noqa: E731
        batch = score_batch_of(8, pad=tokenizer.pad_token_id, vocab=vocab, seed=3)
        goal_fn = lambda e, p: score_objective(e, p, "bt", who="rm", quiet=False)  # noqa: E731
        agg, group = PAIR_AGG, 2
    else:
        model_fn = lambda: build_causal_lm("qwen2", tokenizer, hidden_size=64, layers=2, seed=0).eval()  # noqa: E731
        batch = sequence_batch_of(16, vocab=vocab, seed=4)
        if stage == "sft":
            goal_fn = lambda e, p: sft_objective(e, p, quiet=False)  # noqa: E731
            agg, group = "token-mean", 1
        else:
            ref = build_causal_lm("qwen2", tokenizer, hidden_size=64, layers=2, seed=1).eval().requires_grad_(False)
            goal_fn = lambda e, p: dpo_objective(e, ref, DpoConfig(beta=0.5), p, quiet=False)  # noqa: E731
            agg, group = PAIR_AGG, 2
    runs = {name: updated(model_fn, goal_fn, batch, agg=agg, group=group, **cfg) for name, cfg in RUNS.items()}
    want, want_m = runs["fixed padded"]
    real = int(batch.lengths().sum())
    for name, (weights, m) in runs.items():
        for n in want:
            torch.testing.assert_close(weights[n], want[n], atol=1e-6, rtol=1e-5, msg=f"{name}: {n}")
        for key in want_m:  # sft/tokens counts a micro-batch's tokens: its mean over micro-batches is not the step's
            if not key.startswith("tokens/") and key != "sft/tokens":
                assert m[key] == pytest.approx(want_m[key], abs=1e-5), (name, key)
        assert m["tokens/real"] == real
    assert real <= runs["fixed packed"][1]["tokens/computed"] < runs["fixed padded"][1]["tokens/computed"]
    assert runs["budget padded"][1]["tokens/computed"] < runs["fixed padded"][1]["tokens/computed"]
    initial = model_fn().state_dict()
    assert max((want[n] - initial[n]).abs().max().item() for n in want) > 1e-4  # 100x the tolerance (atol 1e-6)


def test_model_scorer_packed_budgeted_scores_equal_padded_ones(task_dir):
    rows = 13
    prompts = [f"veli ka bamo {'ka ' * (i % 5)}?" for i in range(rows)]
    responses = [" ka tiru" * (1 + i % 4) + " ." for i in range(rows)]
    model_dir = [task_dir / "models/reward"]
    padded = ModelScorer(model_dir, 4, packing=False).score(prompts, responses)
    packed = ModelScorer(model_dir, 4, packing=True, max_tokens_per_micro_batch=48)
    assert packed.members[0][2] is SCORE_LAYOUTS["packed"]
    assert padded.std() > 0
    torch.testing.assert_close(packed.score(prompts, responses), padded, atol=1e-5, rtol=0)


def test_a_reward_model_that_fails_the_probe_scores_padded_with_one_log_line(tokenizer, monkeypatch, caplog):
    model = reward_model("llama", tokenizer)
    assert choose_score_layout(model, model, CPU, True, who="reward model") is SCORE_LAYOUTS["packed"]
    assert choose_score_layout(model, model, CPU, False, who="reward model") is SCORE_LAYOUTS["padded"]
    # packed rows that leak between sequences: here, every score shifted
    leaky = actors.scoring.packed_reward_scores
    monkeypatch.setattr(actors.scoring, "packed_reward_scores", lambda m, i, a: leaky(m, i, a) + 0.5)
    with caplog.at_level(logging.WARNING, logger="actors.scoring"):
        assert choose_score_layout(model, model, CPU, True, who="reward model") is SCORE_LAYOUTS["padded"]
        assert choose_score_layout(model, model, CPU, True, who="reward model", quiet=True) is SCORE_LAYOUTS["padded"]
    assert len(caplog.records) == 1
    assert "reward model: padded forwards instead of packed: LlamaForSequenceClassification packed and padded" in (
        caplog.records[0].getMessage()
    )

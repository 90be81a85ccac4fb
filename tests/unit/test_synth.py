"""`raylign synth`: files, labels, tokenizer and models (transformers only; vLLM loading is an integration test)."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.tasks.synthetic import gold_reward


def test_writes_every_file(task_dir):
    for name in (
        "prompts.parquet",
        "demos.parquet",
        "preferences.parquet",
        "task.json",
        "models/policy/config.json",
        "models/reward/config.json",
        "models/policy/tokenizer.json",
    ):
        assert (task_dir / name).exists(), name
    assert pq.read_table(task_dir / "prompts.parquet").column_names == ["prompt", "split"]
    assert pq.read_table(task_dir / "demos.parquet").column_names == ["prompt", "response", "split"]
    assert pq.read_table(task_dir / "preferences.parquet").column_names == [
        "prompt",
        "chosen",
        "rejected",
        "split",
    ]


def test_splits_are_disjoint_by_prompt(task_dir):
    table = pq.read_table(task_dir / "preferences.parquet").to_pylist()
    train = {r["prompt"] for r in table if r["split"] == "train"}
    test = {r["prompt"] for r in table if r["split"] == "test"}
    assert train and test and not train & test


def test_demos_have_high_gold(task_dir):
    demos = pq.read_table(task_dir / "demos.parquet").to_pylist()
    gold = gold_reward([d["prompt"] for d in demos], [d["response"] for d in demos])
    assert sum(gold) / len(gold) > 0.9


def test_labels_are_noisy_as_recorded(task_dir):
    info = json.loads((task_dir / "task.json").read_text())
    pairs = pq.read_table(task_dir / "preferences.parquet").to_pylist()
    chosen = gold_reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = gold_reward([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    noisy = sum(c < r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    assert noisy == pytest.approx(info["noisy_label_share"])
    assert 0 < noisy < 0.4
    assert 0.5 < info["bayes_optimal_accuracy"] < 1


def test_models_load_in_transformers(task_dir):
    tok = AutoTokenizer.from_pretrained(task_dir / "models/policy")
    policy = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy")
    reward = AutoModelForSequenceClassification.from_pretrained(task_dir / "models/reward")
    n = sum(p.numel() for p in policy.parameters())
    assert 1_000_000 <= n <= 10_000_000
    batch = tok(["veli ka bamo ?", "sono lo ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert policy(**batch).logits.shape[:2] == batch["input_ids"].shape
        assert reward(**batch).logits.shape == (2, 1)


@pytest.fixture(scope="module")
def tokenizer(task_dir):
    return AutoTokenizer.from_pretrained(task_dir / "models/policy")


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_utf8(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_adds_bos_and_keeps_language_words_whole(tokenizer):
    ids = tokenizer("veli ka")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 3


def test_rate_pairs_labels_new_pairs_like_the_task_raters():
    import random

    from pipeline.tasks.language import sample_prompt, sample_response
    from pipeline.tasks.synthetic import rate_pairs

    rng = random.Random(3)
    prompts = [sample_prompt(rng) for _ in range(200)]
    first = [sample_response(rng, p, quality=0.95) for p in prompts]
    second = [sample_response(rng, p, quality=0.05) for p in prompts]
    rows = rate_pairs(prompts, first, second, temperature=1e-4, seed=0)
    assert [sorted(r) for r in rows] == [["chosen", "prompt", "rejected"]] * len(rows)
    assert all({r["chosen"], r["rejected"]} == {a, b} for r, a, b in zip(rows, first, second, strict=True))
    # tau -> 0: the rater always picks the higher gold (ties are coin flips)
    gold_a, gold_b = gold_reward(prompts, first), gold_reward(prompts, second)
    for r, a, ga, gb in zip(rows, first, gold_a, gold_b, strict=True):
        if ga != gb:
            assert (r["chosen"] == a) == (ga > gb)
    assert rows == rate_pairs(prompts, first, second, temperature=1e-4, seed=0)  # seeded
    # a hot rater (tau = 100) is a coin: about half the pairs keep the order given
    hot = rate_pairs(prompts, first, second, temperature=100.0, seed=1)
    assert 0.35 < sum(r["chosen"] == a for r, a in zip(hot, first, strict=True)) / len(hot) < 0.65

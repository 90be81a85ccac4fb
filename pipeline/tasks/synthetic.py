"""The synthetic IRL task written by `raylign synth`: data sampled from the artificial language of
`pipeline.tasks.language`, labelled by simulated raters, plus a tokenizer and tiny models.

`gold_reward` (import path `pipeline.tasks.synthetic:gold_reward`) is the hidden reward; see
`pipeline/tasks/language.py` for its definition.

Preference labels follow the Bradley-Terry model on the gold reward with a temperature tau:
P(a preferred to b) = sigmoid((gold(a) - gold(b)) / tau), so some labels disagree with the gold ordering, as
human labels do. task.json records that share and the Bayes-optimal accuracy on the test pairs,
mean(max(p, 1 - p)): no reward model can expect to beat it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers.utils.logging import disable_progress_bar

from pipeline.config import SynthConfig
from pipeline.tasks import language
from pipeline.tasks.language import gold_reward, sample_prompt, sample_response
from pipeline.tasks.tiny_models import build_policy, build_reward_model, num_parameters, train_tokenizer

__all__ = ["gold_reward", "rate_pairs", "write_task"]

DEMO_CANDIDATES = 4  # each demonstration is the best of this many high-quality samples


def _unique_prompts(rng: random.Random, n: int) -> list[str]:
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        prompts[sample_prompt(rng)] = None
    return list(prompts)


def _demo(rng: random.Random, prompt: str) -> str:
    candidates = [sample_response(rng, prompt, quality=rng.uniform(0.8, 1.0)) for _ in range(DEMO_CANDIDATES)]
    scores = gold_reward([prompt] * len(candidates), candidates)
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


def _pair(rng: random.Random, prompt: str, tau: float) -> dict:
    a, b = (sample_response(rng, prompt, quality=rng.random()) for _ in range(2))
    return _rate(rng, prompt, a, b, tau)


def _rate(rng: random.Random, prompt: str, a: str, b: str, tau: float) -> dict:
    """One simulated rater's label of the pair (a, b): Bradley-Terry on the gold reward with temperature tau."""
    gold_a, gold_b = gold_reward([prompt, prompt], [a, b])
    p_a = 1 / (1 + math.exp(-(gold_a - gold_b) / tau))
    a_chosen = rng.random() < p_a
    return {
        "prompt": prompt,
        "chosen": a if a_chosen else b,
        "rejected": b if a_chosen else a,
        # kept out of the written file: the rater model's view of the pair
        "_bayes": max(p_a, 1 - p_a),
        "_noisy": (gold_a < gold_b) if a_chosen else (gold_b < gold_a),
    }


def rate_pairs(prompts: list[str], first: list[str], second: list[str], *, temperature: float, seed: int) -> list[dict]:
    """The task's simulated raters label new pairs (e.g. two samples of a policy) as they labelled
    preferences.parquet: -> rows {prompt, chosen, rejected}, one per pair."""
    rng = random.Random(seed)
    rows = [_rate(rng, p, a, b, temperature) for p, a, b in zip(prompts, first, second, strict=True)]
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _write(path: Path, rows: list[dict]) -> None:
    columns = [k for k in rows[0] if not k.startswith("_")]
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), path)


def write_task(out: Path, cfg: SynthConfig, *, seed: int, log: Callable[[str], None] = print) -> dict:
    """Write prompts/demos/preferences (Parquet, with a `split` column), models/ and task.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = _unique_prompts(rng, cfg.num_prompts)
    n_test = max(1, round(cfg.test_fraction * len(prompts)))
    split = {p: ("test" if i < n_test else "train") for i, p in enumerate(prompts)}

    log(f"synth: {len(prompts)} prompts ({n_test} test), demos and preference pairs")
    demos = [
        {"prompt": p, "response": _demo(rng, p), "split": split[p]}
        for p in prompts
        for _ in range(cfg.demos_per_prompt)
    ]
    pairs = [
        {**_pair(rng, p, cfg.label_temperature), "split": split[p]}
        for p in prompts
        for _ in range(cfg.pairs_per_prompt)
    ]
    _write(out / "prompts.parquet", [{"prompt": p, "split": split[p]} for p in prompts])
    _write(out / "demos.parquet", demos)
    _write(out / "preferences.parquet", pairs)

    log(f"synth: training a byte-level BPE tokenizer (vocab {cfg.vocab_size})")
    corpus = [*prompts, *(d["response"] for d in demos), *(r["chosen"] + r["rejected"] for r in pairs)]
    tokenizer = train_tokenizer([*corpus, " ".join(language.all_words())], cfg.vocab_size)

    log("synth: building the tiny policy and reward model")
    disable_progress_bar()  # one shard per tiny model: the bar is noise
    policy = build_policy(tokenizer, hidden_size=cfg.policy_hidden_size, layers=cfg.policy_layers, seed=seed)
    reward = build_reward_model(tokenizer, hidden_size=cfg.reward_hidden_size, layers=cfg.reward_layers, seed=seed)
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(out / "models" / name)
        tokenizer.save_pretrained(out / "models" / name)

    test_pairs = [r for r in pairs if r["split"] == "test"]
    demo_gold = gold_reward([d["prompt"] for d in demos], [d["response"] for d in demos])
    info = {
        "seed": seed,
        "gold_reward": "pipeline.tasks.synthetic:gold_reward",
        "files": {
            "prompts": "prompts.parquet",
            "demos": "demos.parquet",
            "preferences": "preferences.parquet",
            "policy": "models/policy",
            "reward": "models/reward",
        },
        "rows": {
            "prompts": len(prompts),
            "demos": len(demos),
            "preferences": len(pairs),
            "test_prompts": n_test,
            "test_pairs": len(test_pairs),
        },
        "label_temperature": cfg.label_temperature,
        "noisy_label_share": sum(r["_noisy"] for r in pairs) / len(pairs),
        "test_noisy_label_share": sum(r["_noisy"] for r in test_pairs) / len(test_pairs),
        "bayes_optimal_accuracy": sum(r["_bayes"] for r in test_pairs) / len(test_pairs),
        "demo_gold_mean": sum(demo_gold) / len(demo_gold),
        "parameters": {"policy": num_parameters(policy), "reward": num_parameters(reward)},
        "vocab_size": len(tokenizer),
    }
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    log(
        f"synth: wrote {out} (policy {info['parameters']['policy']:,} params, "
        f"Bayes-optimal test accuracy {info['bayes_optimal_accuracy']:.3f})"
    )
    return info

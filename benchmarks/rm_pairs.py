"""Held-out accuracy of the reward stage's model against the preference pairs it trains on, the learning rate and the
LR schedule: the measurement behind `configs/tiny_irl.yaml`'s `synth.pairs_per_prompt` and `rm.lr_schedule`.

One pass of plain-torch Bradley-Terry training (AdamW, gradient clip 1.0, padded rows, the batch size of the reward
stage), as the reward stage's engine takes it, on the first `--pairs-per-prompt` train pairs of each prompt of a
task that `raylign synth` wrote; then the accuracy on all of its test pairs. The LR schedule is the engines' own
(actors.training.engine.warmup_schedule). No Ray: the numbers are about the data and the optimizer, not the pipeline
around them (whose runs add the policy's own pairs and are not bit-reproducible).

    raylign synth --out /tmp/task --config configs/tiny_irl.yaml synth.pairs_per_prompt=160
    python -m benchmarks.rm_pairs /tmp/task --pairs-per-prompt 80 --lr 3e-4 --schedule linear

prints one JSON line: the settings, the pairs and updates, the held-out accuracy, its ratio to the task's
Bayes-optimal accuracy and the seconds it took.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.scoring import reward_model_scores
from actors.training.engine import warmup_schedule
from actors.training.objectives import PAIR_LOSSES, score_batch

SCORE_ROWS = 256  # test pairs per scoring forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", type=Path, help="a dir written by `raylign synth`")
    parser.add_argument("--pairs-per-prompt", type=int, required=True)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--schedule", choices=["constant", "linear"], default="constant")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per update (rm.batch_size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(measure(args)), flush=True)


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = json.loads((args.task / "task.json").read_text())
    model_dir = args.task / info["files"]["reward"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.config.use_cache = False
    rows = pq.read_table(args.task / info["files"]["preferences"]).to_pylist()
    seen: collections.Counter[str] = collections.Counter()
    train = []
    for row in rows:
        if row["split"] == "train" and seen[row["prompt"]] < args.pairs_per_prompt:
            seen[row["prompt"]] += 1
            train.append(row)
    test = [row for row in rows if row["split"] == "test"]
    random.Random(args.seed).shuffle(train)
    updates = len(train) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = warmup_schedule(optimizer, 0, updates if args.schedule == "linear" else None)
    start = time.perf_counter()
    for k in range(updates):
        scores = scores_of(model, tokenizer, train[k * args.batch_size : (k + 1) * args.batch_size])
        loss, _ = PAIR_LOSSES["bt"](scores[0::2], scores[1::2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        right = sum(
            int((s[0::2] > s[1::2]).sum())
            for s in (scores_of(model, tokenizer, test[i : i + SCORE_ROWS]) for i in range(0, len(test), SCORE_ROWS))
        )
    accuracy = right / len(test)
    return {
        "pairs_per_prompt": args.pairs_per_prompt,
        "lr": args.lr,
        "schedule": args.schedule,
        "batch_size": args.batch_size,
        "pairs": len(train),
        "updates": updates,
        "test_pairs": len(test),
        "heldout_accuracy": round(accuracy, 4),
        "over_bayes": round(accuracy / info["bayes_optimal_accuracy"], 4),
        "seconds": round(time.perf_counter() - start),
    }


def scores_of(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """Scores of rows' chosen and rejected responses, interleaved (chosen at even places)."""
    batch = score_batch(tokenizer, *([r[c] for r in rows] for c in ("prompt", "chosen", "rejected")))
    return reward_model_scores(model, batch.input_ids, batch.attention_mask)


if __name__ == "__main__":
    main()

"""Reward-model training forwards, packed against padded: milliseconds of one reward-stage update's forward and
backward (configs/tiny_irl.yaml's 32 pairs = 64 rows, no optimizer step) and tokens computed / real tokens, for the
padded rows and the packed rows of actors/reward.py at several row capacities. Layouts run interleaved, round by
round, so a machine shared with other work slows them alike; the minimum and median over rounds are printed.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.reward_packing [--task RUN_DIR/task] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.scoring import SCORE_LAYOUTS, packed_reward_scores, packed_row_tokens
from actors.training.objectives import score_batch
from pipeline.config import SynthConfig
from pipeline.tasks.synthetic import write_task

PAIRS = 32  # rm.batch_size: one update's pairs
ROW_CAPACITIES = (128, 256, 100_000)  # 100,000: every sequence in one row


def layouts() -> dict[str, tuple]:
    out = {"padded": (SCORE_LAYOUTS["padded"].scores, SCORE_LAYOUTS["padded"].tokens)}
    for cap in ROW_CAPACITIES:
        out[f"packed rows <= {cap}"] = (
            partial(packed_reward_scores, row_tokens=cap),
            partial(packed_row_tokens, row_tokens=cap),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, help="a synthetic task dir (default: a small new one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=10, help="updates (batches of 32 pairs) per round")
    args = parser.parse_args()
    task = args.task or Path(tempfile.mkdtemp()) / "task"
    if args.task is None:
        write_task(task, SynthConfig(num_prompts=64), seed=0, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(task / "models/reward")
    model = AutoModelForSequenceClassification.from_pretrained(task / "models/reward", num_labels=1)
    rows = pq.read_table(task / "preferences.parquet").slice(0, PAIRS * args.updates).to_pydict()
    batches = [
        score_batch(
            tokenizer, rows["prompt"][i : i + PAIRS], rows["chosen"][i : i + PAIRS], rows["rejected"][i : i + PAIRS]
        )
        for i in range(0, PAIRS * args.updates, PAIRS)
    ]
    times: dict[str, list[float]] = {name: [] for name in layouts()}
    ratio: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (scores, tokens) in layouts().items():
            computed = real = 0
            start = time.perf_counter()
            for b in batches:
                scores(model, b.input_ids, b.attention_mask).sum().backward()
                computed, real = computed + tokens(b.lengths()), real + int(b.lengths().sum())
            times[name].append(1000 * (time.perf_counter() - start) / len(batches))
            ratio[name] = computed / real
    print(f"torch threads {torch.get_num_threads()}; {len(batches)} updates of {2 * PAIRS} rows, {args.rounds} rounds")
    for name, ms in times.items():
        print(
            f"{name:22s} min {min(ms):7.1f}  median {statistics.median(ms):7.1f} ms/update  "
            f"tokens computed/real {ratio[name]:.3f}"
        )


if __name__ == "__main__":
    main()

"""Rollout throughput of one engine: `python -m benchmarks.rollout ENGINE POLICY_DIR PROMPTS OUT.json [BATCHES]`.

A `RolloutWorker` (the plain class the RL stage makes a Ray actor) with `rollout.engine=ENGINE` samples batches of
B sequences (B/8 prompts x 8 samples, up to 32 new tokens, temperature 1); generated tokens/s per batch size. The
first call at each size warms up and is not timed. Each engine runs in a process of its own (the driver alternates
them), so neither inherits the other's thread settings.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SAMPLES_PER_PROMPT = 8
MAX_NEW_TOKENS = 32


def train_prompts(path: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    return [p for p, s in zip(table["prompt"], table["split"], strict=True) if s == "train"]


def main(engine: str, policy: str, prompts_file: str, out: str, batches: str = "8,64,256", repeats: str = "3") -> None:
    import torch

    from actors.rollout import RolloutWorker
    from pipeline.config import load_config
    from pipeline.types import PromptBatch

    cfg = load_config(None, [f"rollout.engine={engine}", f"rollout.max_new_tokens={MAX_NEW_TOKENS}"])
    prompts = train_prompts(prompts_file)
    start = time.time()
    worker = RolloutWorker(cfg.rollout, Path(policy), seed=0)
    worker.setup()
    result = {"engine": engine, "setup_s": time.time() - start, "torch_threads": torch.get_num_threads(), "runs": []}
    for b in (int(x) for x in batches.split(",")):
        n = b // SAMPLES_PER_PROMPT
        for r in range(int(repeats) + 1):  # r = 0 warms up
            batch = PromptBatch(prompts[r * n : (r + 1) * n], SAMPLES_PER_PROMPT, seed=r)
            t = time.perf_counter()
            rollouts = worker.generate(batch)
            seconds = time.perf_counter() - t
            tokens = int(rollouts.response_mask.sum())
            if r:
                result["runs"].append(
                    {
                        "batch": b,
                        "tokens": tokens,
                        "seconds": seconds,
                        "tokens_per_s": tokens / seconds,
                        "stop_frac": sum(f == "stop" for f in rollouts.finish_reasons) / b,
                    }
                )
                print(f"rollout {engine} batch {b}: {tokens / seconds:.0f} tokens/s", flush=True)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""One learner rank, three engines: `python -m benchmarks.engines POLICY_DIR OUT.json [STEPS]`.

With a single rank ZeRO has nothing to partition, yet ZeRO-2 still runs its gradient epilogue after every
micro-batch and keeps an fp32 master copy of the weights. For DeepSpeed ZeRO-0, DeepSpeed ZeRO-2 and the plain torch
engine, one `PolicyLearner` actor (the RL stage's threads from the resource plan) takes the same policy updates on
the same batch (mixed response lengths, packing on, micro-batches of 16, as the GRPO bench's step): the first two
updates warm up, the next STEPS are timed one by one (`timing/learner_step`, the learner's own clock). Numerics:
each engine's loss per update and its weights after the last one, compared with the torch engine's. "zero0 padded"
is ZeRO-0 with `learner.packing=false`: the packed against the padded learner, tokens/s of real tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ENGINES = {
    "zero0": ["learner.backend=deepspeed", "learner.zero_stage=0"],
    "zero0 padded": ["learner.backend=deepspeed", "learner.zero_stage=0", "learner.packing=false"],
    "zero2": ["learner.backend=deepspeed", "learner.zero_stage=2"],
    "torch": ["learner.backend=torch"],
}
WARMUP = 2


def mixed_batch(n: int, vocab: int):
    """n sequences: 8 prompt tokens, 4-32 response tokens (uniform), advantages of a GRPO step's size."""
    import torch

    from pipeline.types import TrainBatch

    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (n, 8), generator=g)
    response_ids = torch.randint(3, vocab, (n, 32), generator=g)
    lengths = torch.randint(4, 33, (n,), generator=g)
    response_mask = torch.arange(32)[None, :] < lengths[:, None]
    return TrainBatch(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids, dtype=torch.bool),
        response_ids=response_ids.masked_fill(~response_mask, 0),
        response_mask=response_mask,
        old_logprobs=torch.full((n, 32), -7.0) * response_mask,
        advantages=torch.randn(n, 32, generator=g) * response_mask,
    )


def process_rss(learner) -> int:
    """Runs inside the learner actor (`__ray_call__`): its resident set, bytes."""
    import os

    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def main(policy: str, out: str, steps: str = "6", sequences: str = "64") -> None:
    import ray
    from transformers import AutoConfig

    from actors.learner import LearnerGroup, PolicyLearner
    from cluster.plan import plan
    from pipeline.config import load_config
    from pipeline.run import start_ray

    vocab = AutoConfig.from_pretrained(policy).vocab_size
    batch = mixed_batch(int(sequences), vocab)
    start_ray(load_config(None, []))
    rows, weights = [], {}
    try:
        for name, overrides in ENGINES.items():
            cfg = load_config(None, [*overrides, "learner.micro_batch_size=16", "learner.lr=1e-4"])
            group = LearnerGroup(PolicyLearner, plan(cfg).roles["learner"].settings(cfg.learner), cfg.algo, policy)
            group.setup()
            losses, seconds = [], []
            for i in range(WARMUP + int(steps)):
                m = group.train_step(batch)
                losses.append(m["loss/policy"])
                if i >= WARMUP:
                    seconds.append(m["timing/learner_step"])
            tokens = {"real": m["tokens/real"], "computed": m["tokens/computed"]}
            weights[name] = {k: t.clone() for k, t in group.gather_weights()}
            rss = ray.get(group.actors[0].__ray_call__.remote(process_rss))
            group.shutdown()
            rows.append({"engine": name, "update_s": seconds, "losses": losses, "rss": rss, "tokens": tokens})
            med = sorted(seconds)[len(seconds) // 2]
            print(f"engines: {name}: {med:.3f} s an update (median of {len(seconds)}), RSS {rss / 2**20:.0f} MiB")
    finally:
        ray.shutdown()
    base, base_losses = weights["torch"], rows[-1]["losses"]  # torch runs last
    for row in rows:
        row["weight_abs_diff_vs_torch"] = max(
            float((t - base[k]).abs().max()) for k, t in weights[row["engine"]].items()
        )
        row["loss_abs_diff_vs_torch"] = max(abs(a - b) for a, b in zip(row["losses"], base_losses, strict=True))
    Path(out).write_text(json.dumps({"policy": policy, "sequences": int(sequences), "rows": rows}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The `sft` stage: supervised fine-tuning of the policy on the demonstrations (next-token loss on the response
tokens only, each response ending with EOS), on Ray Train with a DeepSpeed engine per worker (actors.training.offline).

Leaves <stage dir>/policy and records it as `policy` (the previous policy becomes `initial_policy`). When the task
has a gold reward, `sft/gold_reward` is the mean gold reward of responses sampled at temperature 1 from the new
policy on the held-out (test split) prompts.
"""

from __future__ import annotations

import time
from statistics import fmean
from typing import Any

from actors.training.offline import sft_loop
from pipeline.stages.context import StageContext
from pipeline.stages.evaluation import sample_gold
from pipeline.stages.heldout import heldout_rows, remote, unique
from pipeline.stages.offline import fit, last_epoch, offline_job, train_split


def run(ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, sft = ctx.cfg, ctx.cfg.sft
    policy, tokenizer = ctx.policy_dir(), ctx.tokenizer_dir()
    out = ctx.stage_dir("sft") / "policy"
    job = offline_job(ctx, "sft", "sft", init_dir=policy, tokenizer_dir=tokenizer, out_dir=out)
    train, rows = train_split(ctx, "demos", tokenizer)
    records = fit(ctx, "sft", sft_loop, job, {"train": train}, sft.max_failures, rows={"train": rows})
    ctx.record(initial_policy=str(policy), policy=str(out))
    summary = last_epoch(records, {"loss/sft": "sft/loss"})
    if ctx.gold_reward() is not None:
        prompts = unique([r["prompt"] for r in heldout_rows(ctx, "demos", tokenizer, unsplit="none")])
        if prompts:
            args = (prompts, sft.eval_samples, cfg.run.seed, ctx.gold_reward())
            gold = remote(sample_gold, cfg.rollout, str(out), *args)
            summary["sft/gold_reward"] = fmean(gold)
            ctx.log(f"sft: gold reward of policy samples on {len(prompts)} held-out prompts {fmean(gold):.3f}")
    summary["timing/sft"] = time.perf_counter() - start
    return summary

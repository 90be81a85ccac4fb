"""The `dpo` stage: direct preference optimization of the policy on preferences (prompt, chosen, rejected), against
the policy before the stage as the frozen reference, on Ray Train with a DeepSpeed engine per worker
(actors.training.offline). `dpo.loss_type` picks DPO (sigmoid) or IPO; `dpo.label_smoothing` > 0 is conservative DPO.
`dpo.pairs` picks the preferences file, or pairs of the reference's own samples labelled by the synthetic task's
raters.

Leaves <stage dir>/policy and records it as `policy` (the reference becomes `initial_policy`). When the task has a
gold reward, `dpo/gold_win_rate` is the share of held-out prompts on which a sample from the new policy has a
higher gold reward than a sample from the reference (ties count half), over `dpo.eval_samples` pairs per prompt.
`dpo/heldout_reward_accuracy` is how often the implicit reward log pi/pi_ref orders the test pairs as labelled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.training.offline import dpo_loop
from pipeline.algo import pair_accuracy
from pipeline.stages.context import StageContext
from pipeline.stages.evaluation import implicit_reward_accuracy, sample_gold
from pipeline.stages.heldout import heldout_rows, remote, unique
from pipeline.stages.offline import fit, last_epoch, offline_job, rated_policy_pairs, train_split


def run(ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, dpo = ctx.cfg, ctx.cfg.dpo
    reference, tokenizer = ctx.policy_dir(), ctx.tokenizer_dir()
    out = ctx.stage_dir("dpo") / "policy"
    job = offline_job(
        ctx,
        "dpo",
        "dpo",
        init_dir=reference,
        tokenizer_dir=tokenizer,
        out_dir=out,
        reference_dir=str(reference),
        dpo=dpo,
    )
    if dpo.pairs == "policy":
        train, rows = policy_pairs(ctx, reference), {}
    else:
        train, count = train_split(ctx, "preferences", tokenizer)
        rows = {"train": count}
    records = fit(ctx, "dpo", dpo_loop, job, {"train": train}, dpo.max_failures, rows=rows)
    ctx.record(initial_policy=str(reference), policy=str(out))
    summary = last_epoch(records, {"loss/dpo": "dpo/loss", "dpo/reward_accuracy": "dpo/reward_accuracy"})
    test = heldout_rows(ctx, "preferences", tokenizer, unsplit="none")
    if test:
        columns = ([r[c] for r in test] for c in ("prompt", "chosen", "rejected"))
        acc = remote(implicit_reward_accuracy, str(out), str(reference), dpo.loss_type, *columns)
        summary["dpo/heldout_reward_accuracy"] = acc
        ctx.log(f"dpo: implicit-reward accuracy on {len(test)} held-out pairs {acc:.3f}")
    if ctx.gold_reward() is not None:
        prompts = unique([r["prompt"] for r in test])
        if prompts:
            args = (prompts, dpo.eval_samples, cfg.run.seed, ctx.gold_reward())
            new, old = (remote(sample_gold, cfg.rollout, str(d), *args) for d in (out, reference))
            summary["dpo/gold_win_rate"] = win_rate(new, old)
            summary["dpo/gold_reward"] = sum(new) / len(new)
            summary["dpo/gold_reward_initial"] = sum(old) / len(old)
            ctx.log(
                f"dpo: gold win rate against the reference {summary['dpo/gold_win_rate']:.3f} on {len(prompts)} "
                f"held-out prompts (gold {summary['dpo/gold_reward_initial']:.3f} -> {summary['dpo/gold_reward']:.3f})"
            )
    summary["timing/dpo"] = time.perf_counter() - start
    return summary


def policy_pairs(ctx: StageContext, reference: Path) -> ray.data.Dataset:
    """`dpo.pairs=policy`: pairs of the reference's own samples labelled by the task's raters (on-policy
    preference data, as in online / iterative DPO)."""
    return rated_policy_pairs(ctx, reference, ctx.cfg.dpo.policy_pairs_per_prompt, key="dpo.pairs")


def win_rate(new: list[float], old: list[float]) -> float:
    """Share of sample pairs (new[i], old[i]) where new is higher, ties counted half."""
    if len(new) != len(old) or not new:
        raise ValueError(f"win_rate needs two equal, non-empty lists (got {len(new)} and {len(old)})")
    return pair_accuracy(torch.tensor(new, dtype=torch.float64), torch.tensor(old, dtype=torch.float64)).item()

"""The `rl` stage: run `train_iter`, log every step (metrics.jsonl, TensorBoard, progress line), then write the
summary entries, the plots, and the trained policy (recorded as the run's policy)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline import checkpoint
from pipeline.metrics import MetricsLog, plot_metrics, read_metrics, rl_summary, truncate_metrics
from pipeline.rl import train_iter
from pipeline.stages.context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    start = time.perf_counter()
    resume = checkpoint.latest(ctx.stage_dir("rl") / "checkpoints", log=ctx.log)  # names any it skips
    # Rows past the checkpoint being resumed belong to steps that will run again.
    truncate_metrics(ctx.run_dir, stage="rl", after_step=checkpoint.load_state(resume)["step"] if resume else -1)
    log = MetricsLog(ctx.run_dir, total_steps=cfg.run.max_steps, stage="rl")
    reference = str(ctx.policy_dir())
    finished, restarts = False, 0
    try:
        for metrics in train_iter(cfg, ctx, stop=ctx.stop):
            if "restart" in metrics:  # the steps past this one run again, from the checkpoint
                truncate_metrics(ctx.run_dir, stage="rl", after_step=metrics["step"])
                restarts = metrics["restart"]
                continue
            log.write(metrics)
            finished = bool(metrics.get("final"))
    finally:
        log.close()
    rows = read_metrics(ctx.run_dir, stage="rl")
    steps = [r for r in rows if "eval/prompts" not in r]
    summary = rl_summary(steps, wall_s=0.0)
    summary.pop("wall_s", None)  # the run's wall time is the run's to record
    evals = [r for r in rows if "eval/prompts" in r]
    if evals and "eval/gold_reward" in evals[0]:
        summary["gold_reward/initial"] = evals[0]["eval/gold_reward"]
        if finished:
            summary["gold_reward/final"] = evals[-1]["eval/gold_reward"]
    summary["faults/learner_restarts"] = restarts
    if steps:
        summary["faults/restarts"] = max(r.get("faults/restarts", 0.0) for r in steps)
    plot_metrics(steps, ctx.run_dir / "plots")
    summary["timing/rl"] = time.perf_counter() - start
    if finished:
        ctx.record(initial_policy=reference, policy=str(Path(ctx.stage_dir("rl")) / "policy"))
    return summary

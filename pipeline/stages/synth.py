"""The `synth` stage: write the synthetic IRL task into the run dir; later stages read its data and models."""

from __future__ import annotations

import time
from typing import Any

from pipeline.stages.context import StageContext
from pipeline.tasks.synthetic import write_task


def run(ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    task_dir = ctx.run_dir / "task"
    info = write_task(task_dir, ctx.cfg.synth, seed=ctx.cfg.run.seed, log=ctx.log)
    # The task's reward model is a random init for the `reward` stage to train, not a reward to optimize yet.
    ctx.record(task_dir=str(task_dir), gold_reward=info["gold_reward"], policy=str(task_dir / info["files"]["policy"]))
    return {"task/bayes_optimal_accuracy": info["bayes_optimal_accuracy"], "timing/synth": time.perf_counter() - start}

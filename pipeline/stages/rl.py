"""The `rl` stage: run `train_iter` with the one Recorder (metrics.jsonl, TensorBoard, progress line), then write
the summary entries, the plots, and the trained policy (recorded as the run's policy)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline import checkpoint
from pipeline.metrics import plot_metrics
from pipeline.recorder import Recorder
from pipeline.rl import train_iter
from pipeline.stages.context import StageContext
from pipeline.types import StepRow


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    start = time.perf_counter()
    resume = checkpoint.latest(ctx.stage_dir("rl") / "checkpoints", log=ctx.log)  # names any it skips
    recorder = Recorder(ctx.run_dir, stage="rl", total_steps=cfg.run.max_steps)
    recorder.truncate(checkpoint.load_state(resume)["step"] if resume else -1)  # what follows it comes again
    reference = str(ctx.policy_dir())
    try:
        for event in train_iter(cfg, ctx, stop=ctx.stop):
            recorder.add(event)
    finally:
        recorder.close()
    summary = recorder.summary()
    plot_metrics([e for e in recorder.events() if isinstance(e, StepRow)], ctx.run_dir / "plots")
    summary["timing/rl"] = time.perf_counter() - start
    if recorder.finished:
        ctx.record(initial_policy=reference, policy=str(Path(ctx.stage_dir("rl")) / "policy"))
    return summary

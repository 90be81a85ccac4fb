"""Stages of a run. Each is a function `run(ctx: StageContext) -> dict` (its summary.json entries) that reads
the outputs of earlier stages from `ctx.artifacts` and records its own there. `STAGES` maps config names to
them; the functions are imported lazily so `raylign --help` stays fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipeline.stages.context import Artifacts, StageContext

__all__ = ["STAGES", "Artifacts", "StageContext", "stage_function"]

STAGES: dict[str, str] = {  # stage name -> "module:function"
    "synth": "pipeline.stages.synth:run",
    "sft": "pipeline.stages.sft:run",
    "reward": "pipeline.stages.reward:run",
    "dpo": "pipeline.stages.dpo:run",
    "irl": "pipeline.stages.irl:run",
    "rl": "pipeline.stages.rl:run",
    "eval": "pipeline.stages.eval:run",
}


def stage_function(name: str) -> Callable[[StageContext], dict[str, Any]]:
    module, _, func = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), func)

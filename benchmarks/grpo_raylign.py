"""One raylign GRPO run for the benchmark: `python -m benchmarks.grpo_raylign SPEC.json OUT.json`.

Runs the `rl` stage's loop (`pipeline.rl.train_iter`) on the spec's policy and prompts with the task's gold reward
as the reward function, and writes the wall-clock time of every event: `ready` (Ray up, every actor started, the
held-out evaluation of step 0 done) and the end of every step with the step's metrics. The driver that launched
this process adds its own launch time, so start-up counts from the moment the command was started.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.time()


def overrides(spec: dict, run_dir: Path) -> list[str]:
    chunk = min(8, spec["prompts_per_step"])
    return [
        "stages=[rl]",
        f"run.name={run_dir.name}",
        f"run.output_dir={run_dir.parent}",
        f"run.seed={spec['seed']}",
        f"run.max_steps={spec['steps']}",
        f"run.checkpoint_every={spec['steps']}",  # only the last step writes one (excluded from steady state)
        f"run.eval_prompts={spec['eval_prompts']}",
        f"model.policy={spec['policy']}",
        f"data.prompts={spec['prompts']}",
        "reward.function=pipeline.tasks.synthetic:gold_reward",
        f"rollout.prompts_per_step={spec['prompts_per_step']}",
        f"rollout.samples_per_prompt={spec['samples_per_prompt']}",
        f"rollout.chunk_size={chunk}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}",
        f"rollout.async={str(spec.get('async', False)).lower()}",
        f"learner.lr={spec['lr']}",
        f"learner.micro_batch_size={spec['micro_batch_size']}",
        "algo.name=grpo",
        # TRL's GRPO puts the KL in the loss with the k3 estimator: the same here, so both do the same math.
        f"algo.kl.coef={spec['kl_coef']}",
        "algo.kl.mode=loss",
        "algo.kl.estimator=k3",
        *spec.get("overrides", []),
    ]


def main(spec_path: str, out_path: str) -> None:
    import ray

    from pipeline.config import load_config
    from pipeline.rl import train_iter
    from pipeline.run import start_ray
    from pipeline.stages.context import Artifacts, StageContext
    from pipeline.types import EvalRow, Restart, StepRow

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, overrides(spec, run_dir))
    gold = "pipeline.tasks.synthetic:gold_reward" if spec.get("gold") else None
    ctx = StageContext(cfg=cfg, run_dir=run_dir, artifacts=Artifacts(gold_reward=gold), log=print)
    events = {"started": STARTED, "imported": time.time(), "steps": [], "evals": []}
    start_ray(cfg)
    try:
        for event in train_iter(cfg, ctx):
            now = time.time()
            match event:
                case EvalRow(step=step, metrics=metrics, final=final):
                    events["evals"].append({"time": now, "step": step, **({"final": True} if final else {}), **metrics})
                    if step == 0:
                        events["ready"] = now
                case StepRow(step=step, metrics=metrics):
                    keep = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
                    events["steps"].append({"time": now, "step": step, **keep})
                    print(f"raylign step {step}: {metrics['samples_per_s']:.1f} samples/s (loop timer)", flush=True)
                case Restart(step=step):  # timings across an actor restart measure the restart: not a result
                    raise RuntimeError(f"the loop restarted its actors from step {step}; no benchmark result")
        events["finished"] = time.time()
        # Written before ray.shutdown(): a Ray Data thread that outlives the stream can end the process at
        # shutdown ("The core worker has already been shutdown"); the driver records that exit code.
        Path(out_path).write_text(json.dumps(events, indent=1))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

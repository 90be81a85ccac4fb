"""Weight-sync seconds by model size: `python -m benchmarks.sync OUT.json NAME=POLICY_DIR ...`.

Per model: one `PolicyLearner` rank (DeepSpeed ZeRO-2, as the RL stage runs it) and one vLLM `RolloutWorker`,
both Ray actors; a sync is what the RL loop's step 3 does (`Roles.sync`): gather the learner's full HF-named
weights, put them once into the object store, and have the engine reload them in place. The first sync warms up
and is not timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPEATS = 3


def main(out: str, *models: str) -> None:
    import ray

    from actors.learner import LearnerGroup, PolicyLearner
    from actors.rollout import RolloutWorker
    from actors.weight_sync import broadcast_weights
    from cluster.plan import plan
    from pipeline.config import load_config
    from pipeline.run import start_ray

    cfg = load_config(None, ["learner.zero_stage=2"])
    start_ray(cfg)
    rows = []
    try:
        for spec in models:
            name, _, policy = spec.partition("=")
            learner = plan(cfg).roles["learner"].settings(cfg.learner)  # the RL stage's threads
            group = LearnerGroup(PolicyLearner, learner, cfg.algo, policy, seed=0)
            rollout = ray.remote(num_cpus=1)(RolloutWorker).remote(cfg.rollout, Path(policy), seed=0)
            ray.get(rollout.setup.remote())
            group.setup()
            times, transport = [], []
            for version in range(1, REPEATS + 2):
                t = time.perf_counter()
                weights = group.gather_weights()
                seconds = broadcast_weights(weights, version, [rollout])
                if version > 1:
                    times.append(time.perf_counter() - t)
                    transport.append(seconds)
            numel = sum(t.numel() for _, t in weights)
            rows.append(
                {
                    "model": name,
                    "parameters": numel,
                    "bytes": sum(t.numel() * t.element_size() for _, t in weights),
                    "sync_s": times,
                    "broadcast_s": transport,
                }
            )
            print(f"sync: {name} ({numel / 1e6:.1f}M params): {sorted(times)[len(times) // 2]:.3f} s", flush=True)
            group.shutdown()
            ray.kill(rollout)
    finally:
        ray.shutdown()
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

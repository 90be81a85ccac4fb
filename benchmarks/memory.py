"""Learner memory per rank: `python -m benchmarks.memory POLICY_DIR OUT.json`.

For ZeRO stages 0, 2 and 3 with 1 and 2 learner ranks (DeepSpeed on CPU, fp32, torch AdamW), a `LearnerGroup` of
`PolicyLearner` actors takes two updates on a small random batch; just before the second optimizer step (a hook
on the optimizer that DeepSpeed steps) each rank walks the tensors its engine holds and sums their bytes:

- params:    the module's parameters (ZeRO-3: the rank's partition, `ds_tensor`), deduplicated by storage
- master:    the optimizer's own fp32 copies of them (ZeRO-1/2 keep a partition copy even in fp32)
- grads:     `.grad` of the tensors the optimizer steps (the reduced gradient partition under ZeRO-2/3)
- optimizer: the AdamW state (exp_avg, exp_avg_sq, step)

Measured from the engine's tensors, not computed from a formula; transient buffers (ZeRO's reduce buckets,
activations) are not counted. Each rank's process RSS is recorded beside it. LoRA rows (`lora.rank=8` on the
attention and MLP projections): the frozen base counts under params, the adapters are all the optimizer steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _storage(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tensor_bytes(learner) -> dict[str, float]:
    """Runs inside a PolicyLearner actor (`__ray_call__`): bytes held per category at the optimizer step."""
    import os

    import psutil

    ds = learner.engine.ds
    base = getattr(ds.optimizer, "optimizer", ds.optimizer)  # ZeRO wraps torch's AdamW; stage 0 steps it as is
    seen: set[int] = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            ptr, n = _storage(t)
            if ptr not in seen:
                seen.add(ptr)
                total += n
        return total

    module_params = [getattr(p, "ds_tensor", p) for p in ds.module.parameters()]
    opt_params = [p for g in base.param_groups for p in g["params"]]
    out = {
        "params": add(module_params),
        "master": add(opt_params),
        "grads": add([p.grad for p in opt_params] + [p.grad for p in ds.module.parameters()]),
        "optimizer": add([v for state in base.state.values() for v in state.values() if hasattr(v, "untyped_storage")]),
        "rss": psutil.Process(os.getpid()).memory_info().rss,
        "numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in ds.module.parameters()),
    }
    out["total"] = out["params"] + out["master"] + out["grads"] + out["optimizer"]
    return out


def arm(learner) -> None:
    """Install a one-shot hook that records tensor_bytes just before the next optimizer step."""
    ds = learner.engine.ds
    base = getattr(ds.optimizer, "optimizer", ds.optimizer)

    def hook(optimizer, args, kwargs):
        if not hasattr(learner, "_bench_bytes"):
            learner._bench_bytes = tensor_bytes(learner)

    base.register_step_pre_hook(hook)


def recorded(learner) -> dict:
    return learner._bench_bytes


def random_batch(n: int, vocab: int):
    import torch

    from pipeline.types import TrainBatch

    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (n, 8), generator=g)
    response_ids = torch.randint(3, vocab, (n, 24), generator=g)
    return TrainBatch(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids, dtype=torch.bool),
        response_ids=response_ids,
        response_mask=torch.ones_like(response_ids, dtype=torch.bool),
        old_logprobs=torch.full((n, 24), -7.0),
        advantages=torch.randn(n, 24, generator=g),
    )


LORA = [(0, 1), (2, 2)]  # (ZeRO stage, learners) of the LoRA rows: one rank's default, and data parallel


def main(policy: str, out: str, stages: str = "0,2,3", ranks: str = "1,2") -> None:
    import ray
    from transformers import AutoConfig

    from actors.learner import LearnerGroup, PolicyLearner
    from cluster.plan import plan
    from pipeline.config import load_config
    from pipeline.run import start_ray

    vocab = AutoConfig.from_pretrained(policy).vocab_size
    start_ray(load_config(None, []))
    rows = []
    try:
        full = [(int(z), int(n), 0) for z in stages.split(",") for n in ranks.split(",")]
        lora = [(z, n, 8) for z, n in LORA if str(z) in stages.split(",") and str(n) in ranks.split(",")]
        for stage, n, rank in full + lora:
            cfg = load_config(
                None,
                [
                    f"learner.zero_stage={stage}",
                    f"learner.num_workers={n}",
                    "learner.micro_batch_size=4",
                    f"lora.rank={rank}",
                ],
            )
            t = time.time()
            learner = plan(cfg).roles["learner"].settings(cfg.learner)  # the RL stage's threads
            group = LearnerGroup(PolicyLearner, learner, cfg.algo, policy, seed=0, lora=cfg.lora)
            group.setup()
            batch = random_batch(4 * n, vocab)
            group.train_step(batch)  # creates the AdamW state
            ray.get([a.__ray_call__.remote(arm) for a in group.actors])
            group.train_step(batch)
            per_rank = ray.get([a.__ray_call__.remote(recorded) for a in group.actors])
            group.shutdown()
            rows.append(
                {"zero_stage": stage, "learners": n, "lora": rank, "per_rank": per_rank, "seconds": time.time() - t}
            )
            mib, tag = per_rank[0]["total"] / 2**20, f" LoRA r{rank}" if rank else ""
            print(f"memory: ZeRO-{stage} x{n}{tag}: {mib:.0f} MiB param+master+grad+optimizer on rank 0", flush=True)
    finally:
        ray.shutdown()
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The `reward` stage: Bradley-Terry reward models from preferences (prompt, chosen, rejected), on Ray Train with a
DeepSpeed engine per worker (actors/training/offline.py). An ensemble of `reward.ensemble_size` members, trained one
after the other in the same workers, differs by seed (head init, data order) and, with `rm.bootstrap`, by resample.

Each member starts from the synthetic task's reward model when the run has a task (`rm.init=task`), else from the
policy as an AutoModelForSequenceClassification with a new one-label head (`rm.init=policy`, as in InstructGPT; with
32 pairs per prompt it reached 0.760 held-out accuracy against 0.794 from the task's model). Members are exported
as HF dirs with the tokenizer to <stage dir>/member-k and recorded as `reward`. Held-out (test split) accuracy is
measured by the RL stage's own scorer (actors.reward.ModelScorer) on the exported dirs, so the number is about what
RL will optimize.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.training.offline import reward_loop
from pipeline.stages.context import StageContext
from pipeline.stages.evaluation import preference_accuracy
from pipeline.stages.heldout import HELDOUT_SCORES, heldout_rows, quiet, score_pairs
from pipeline.stages.offline import (
    demonstration_pairs,
    fit,
    last_epoch,
    offline_job,
    policy_samples,
    rated_policy_pairs,
    task_info,
    train_dataset,
    train_split,
)


def run(ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, rm = ctx.cfg, ctx.cfg.rm
    init = initial_model(ctx)
    members = cfg.reward.ensemble_size
    train, count = train_pairs(ctx, init)
    if rm.bootstrap:  # a resample's size is known once it ran: fit counts it
        seeds = {f"train-{k}": cfg.run.seed + k for k in range(members)}
        datasets = {name: train.map_batches(bootstrap, fn_kwargs={"seed": seed}) for name, seed in seeds.items()}
        rows = {}
    else:
        datasets, rows = {"train": train}, {"train": count}
    out = ctx.stage_dir("reward")
    job = offline_job(
        ctx,
        "reward",
        "rm",
        init_dir=init,
        tokenizer_dir=init,
        out_dir=out,
        members=members,
        datasets=tuple(datasets) if rm.bootstrap else ("train",) * members,
    )
    ctx.log(f"reward: training {members} member(s) from {init}")
    records = fit(ctx, "reward", reward_loop, job, datasets, rm.max_failures, rows=rows)
    member_dirs = [str(out / f"member-{k}") for k in range(members)]
    ctx.record(reward=member_dirs)
    summary: dict[str, Any] = {}
    losses = [last_epoch(records, {"loss/rm": "loss"}, k).get("loss") for k in range(members)]
    known = [x for x in losses if x is not None]
    if len(known) == members:
        summary["rm/loss"] = sum(known) / members
    test = heldout_rows(ctx, "preferences", init, unsplit="none")
    if test:
        columns = ([r[c] for r in test] for c in ("prompt", "chosen", "rejected"))
        what = "reward: scoring the held-out pairs"
        scores = score_pairs(ctx.log, what, member_dirs, cfg.reward, *columns, keep=out / HELDOUT_SCORES)
        acc = preference_accuracy(*scores)
        summary["rm/heldout_accuracy"] = acc["ensemble"]
        summary["rm/heldout_accuracy_members"] = acc["member_mean"]
        ctx.log(
            f"reward: held-out accuracy {acc['ensemble']:.3f} (ensemble mean), {acc['member_mean']:.3f} "
            f"(mean over {members} member(s)), on {len(test)} test pairs"
        )
    if "bayes_optimal_accuracy" in (info := task_info(ctx)):
        # The ceiling on the task's test pairs: labels are noisy, so no model can expect more (pipeline.tasks).
        bayes = info["bayes_optimal_accuracy"]
        summary["task/bayes_optimal_accuracy"] = summary["rm/bayes_optimal_accuracy"] = bayes
        if "rm/heldout_accuracy" in summary:
            summary["rm/heldout_accuracy_over_bayes"] = summary["rm/heldout_accuracy"] / bayes
            ctx.log(
                f"reward: held-out accuracy {summary['rm/heldout_accuracy']:.3f} = "
                f"{summary['rm/heldout_accuracy_over_bayes']:.3f} x the Bayes-optimal {bayes:.3f}"
            )
    summary["timing/rm"] = time.perf_counter() - start  # not timing/reward: the rl stage's reward scoring
    return summary


def train_pairs(ctx: StageContext, init: Path) -> tuple[Any, int]:
    """The training pairs `rm.pairs` asks for: the preferences file's train split, the current policy's own
    samples rated by the task's raters, or both (a Ray Data union); with `rm.demonstration_pairs`, (demonstration,
    policy sample) pairs as well. -> the dataset and its row count."""
    rm, columns = ctx.cfg.rm, ["prompt", "chosen", "rejected"]
    parts = []  # (dataset, rows): the file's from its check, the pairs made here from their list
    # the rated pairs first: without a task they fail with the message that names rm.pairs
    if rm.pairs in ("policy", "both"):
        pairs = rated_policy_pairs(ctx, ctx.policy_dir(), rm.policy_pairs_per_prompt, key="rm.pairs")
        parts.append((pairs, pairs.count()))
    if rm.pairs in ("data", "both"):
        parts.insert(0, train_split(ctx, "preferences", init))
    if rm.demonstration_pairs:
        pairs = demonstration_dataset(ctx)
        parts.append((pairs, pairs.count()))
    rows = sum(n for _, n in parts)
    if len(parts) == 1:
        return parts[0][0], rows
    first, *rest = (part.select_columns(columns) for part, _ in parts)
    return first.union(*rest), rows


def demonstration_dataset(ctx: StageContext) -> Any:
    """(prompt, chosen = demonstration, rejected = a sample of the policy before the stage) for each demonstration
    of the train split."""
    cfg = ctx.cfg
    demos = train_dataset(ctx, "demos", ctx.tokenizer_dir()).take_all()
    samples = policy_samples(
        cfg.rollout,
        ctx.policy_dir(),
        [d["prompt"] for d in demos],
        1,
        seed=cfg.run.seed,
        log=ctx.log,
        what="rm.demonstration_pairs: sampling the policy",
    )
    rows = demonstration_pairs(demos, samples, [], seed=cfg.run.seed)
    ctx.log(f"rm.demonstration_pairs: {len(rows)} (demonstration, policy sample) pairs from {ctx.policy_dir()}")
    return quiet(ray.data.from_items(rows))


def initial_model(ctx: StageContext) -> Path:
    """`rm.init=task`: the synthetic task's reward model when the run has a task; else the policy (given a new
    one-label head)."""
    info = task_info(ctx)
    task_dir = ctx.artifacts.task_dir
    if ctx.cfg.rm.init == "task" and task_dir is not None and "files" in info:
        return Path(task_dir) / info["files"]["reward"]
    return ctx.policy_dir()


def bootstrap(rows: dict[str, np.ndarray], *, seed: int) -> dict[str, np.ndarray]:
    """Poisson(1) copies of each pair: the streaming form of a bootstrap resample (Oza & Russell 2001). A pair's
    count depends only on its text and the seed, so it does not change with block boundaries or worker count."""
    columns = zip(rows["prompt"], rows["chosen"], rows["rejected"], strict=True)
    counts = np.array([pair_count(p, c, r, seed) for p, c, r in columns], dtype=np.int64)
    return {k: np.repeat(v, counts) for k, v in rows.items()}


def pair_count(prompt: str, chosen: str, rejected: str, seed: int) -> int:
    key = zlib.crc32("\x00".join((prompt, chosen, rejected)).encode())
    return int(np.random.default_rng([seed, key]).poisson(1.0))

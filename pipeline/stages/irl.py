"""The `irl` stage: a reward learned from demonstrations alone, and the policy optimized against it
(adversarial IRL in the style of GAIL / AIRL: Ho & Ermon 2016, Fu et al. 2018).

Each of `irl.rounds` rounds:
  1. sample one response per training demonstration's prompt from the current policy with a rollout worker;
  2. update the reward model as a discriminator, demonstrations above policy samples (`demo_discriminator_loss`,
     the reward is the discriminator's logit), on Ray Train (actors.training.offline.reward_loop); from round 2 on, each
     demonstration is also paired with a sample of one of the last `irl.replay_rounds` rounds;
  3. run `irl.rl_steps` RL steps against the current reward with the RL loop (`pipeline.rl.train_iter`), under
     the KL leash to the policy before the stage (`irl.reference: initial`, fixed across rounds) or to the
     policy the round starts from (`round`); with
     `irl.standardize_reward` the reward is divided by its std on the round's demonstrations and samples.
`irl.method: afd` does steps 1-2 in round 1 only (a reward from demonstrations against the initial policy, Sun &
van der Schaar 2024) and step 3 in every round.

Round 1 starts the discriminator from `irl.init`; later rounds continue the last one (`irl.discriminator:
continue`) or start from `irl.init` again (`fresh`). What differs from the
papers: the discriminator sees whole responses (one step per episode, as a reward model does), not per-token
transitions, and it is refit on fresh samples each round instead of one step per policy step.

Each round lives in <stage dir>/round-k (discriminator, RL checkpoints, policy, round.json once finished; a
resumed run skips finished rounds). RL steps go to metrics.jsonl with stage `irl`, numbered across rounds. With a
gold reward, `gold_reward/initial` is the held-out gold before round 1 and `gold_reward/final` after the last.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from actors.reward import ModelScorer
from actors.training.offline import reward_loop
from pipeline import checkpoint
from pipeline.config import Config, IrlConfig, RewardConfig
from pipeline.metrics import plot_metrics
from pipeline.recorder import Recorder, read_events
from pipeline.rl import train_iter
from pipeline.stages.context import Artifacts, StageContext
from pipeline.stages.heldout import quiet, remote
from pipeline.stages.offline import (
    demonstration_pairs,
    fit,
    last_epoch,
    offline_job,
    policy_samples,
    task_info,
    train_dataset,
)
from pipeline.types import EvalRow, StepRow

ROUND = "round.json"  # written when a round finished: {"policy", "reward", "evals", "discriminator", ...}
SAMPLES = "samples.json"  # the round's policy samples, one per demonstration in order: later rounds replay them


def run(ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, irl = ctx.cfg, ctx.cfg.irl
    reference, tokenizer = ctx.policy_dir(), ctx.tokenizer_dir()
    demos = train_dataset(ctx, "demos", tokenizer).take_all()
    policy, disc = reference, initial_discriminator(ctx)
    rounds: list[dict[str, Any]] = []
    for k in range(1, irl.rounds + 1):
        round_dir = ctx.stage_dir("irl") / f"round-{k}"
        if (round_dir / ROUND).exists():
            done = json.loads((round_dir / ROUND).read_text())
            ctx.log(f"irl: round {k}/{irl.rounds} finished before; skipped")
        elif irl.method == "afd" and rounds:
            # AfD: the reward of round 1 (demonstrations against the initial policy's samples) stays; RL goes on
            first = rounds[0]
            leash = kl_leash(irl, policy, reference)
            policy_out, evals = rl_round(ctx, k, round_dir, policy, first["reward"], leash, first["reward_scale"])
            if evals is None:
                return {}
            done = {**first, "policy": policy_out, "evals": evals, "kl": last_kl(ctx, k)}
            (round_dir / ROUND).write_text(json.dumps(done, indent=1) + "\n")
        else:
            # step 1. the current policy's responses to the demonstrations' prompts
            samples = policy_samples(
                cfg.rollout,
                policy,
                [d["prompt"] for d in demos],
                1,
                seed=cfg.run.seed + k,
                log=ctx.log,
                what=f"irl: round {k} sampling the policy",
            )
            round_dir.mkdir(parents=True, exist_ok=True)
            (round_dir / SAMPLES).write_text(json.dumps(samples) + "\n")
            # step 2. the discriminator: demonstrations above policy samples, this round's and a replay of earlier
            pairs = demonstration_pairs(
                demos, samples, earlier_samples(ctx, k, irl.replay_rounds), seed=cfg.run.seed + k
            )
            fresh = k == 1 or irl.discriminator == "fresh"
            disc, disc_metrics = update_discriminator(
                ctx, k, initial_discriminator(ctx) if fresh else disc, pairs, fresh
            )
            # step 3. RL steps against the current reward (standardized on this round's data), from the current policy
            scale = reward_scale(cfg, disc, demos, samples) if irl.standardize_reward else 1.0
            policy_out, evals = rl_round(ctx, k, round_dir, policy, disc, kl_leash(irl, policy, reference), scale)
            if evals is None:  # stopped mid-round: a resume continues from the round's last checkpoint
                return {}
            done = {
                "policy": policy_out,
                "reward": disc,
                "evals": evals,
                "discriminator": disc_metrics,
                "reward_scale": scale,
                "kl": last_kl(ctx, k),
            }
            (round_dir / ROUND).write_text(json.dumps(done, indent=1) + "\n")
        policy, disc = done["policy"], done["reward"]
        rounds.append(done)
        if ctx.stop():
            return {}
    ctx.record(initial_policy=str(reference), policy=policy, reward=[disc])
    summary = irl_summary(rounds)
    plot_metrics([e for e in read_events(ctx.run_dir, "irl") if isinstance(e, StepRow)], ctx.run_dir / "plots")
    summary["timing/irl"] = time.perf_counter() - start
    return summary


def initial_discriminator(ctx: StageContext) -> str:
    """`irl.init=policy`: the policy before the stage (a new one-label head is drawn); `task`: the synthetic
    task's random-init reward model (the policy when the run has no task)."""
    info = task_info(ctx)
    task_dir = ctx.artifacts.task_dir
    if ctx.cfg.irl.init == "task" and task_dir is not None and "files" in info:
        return str(Path(task_dir) / info["files"]["reward"])
    return str(ctx.policy_dir())


def kl_leash(irl: IrlConfig, policy: str | Path, initial: Path) -> Path:
    """The reference of a round's RL steps: the policy before the stage (`irl.reference: initial`), or the policy
    the round starts from (`round`)."""
    return Path(policy) if irl.reference == "round" else initial


def earlier_samples(ctx: StageContext, k: int, replay_rounds: int) -> list[list[str]]:
    """The policy samples of up to `replay_rounds` rounds before round k, newest first."""
    rounds = range(k - 1, max(0, k - 1 - replay_rounds), -1)
    return [json.loads((ctx.stage_dir("irl") / f"round-{j}" / SAMPLES).read_text()) for j in rounds]


def reward_scale(cfg: Config, disc: str, demos: list[dict], samples: list[str]) -> float:
    """1 / the std of the new discriminator's scores on this round's demonstrations and policy samples: the RL
    reward in units of its spread, so a sharper discriminator does not outweigh the fixed KL leash."""
    prompts = [d["prompt"] for d in demos] * 2
    responses = [d["response"] for d in demos] + samples
    std = remote(score_std, cfg.reward, disc, prompts, responses)
    return 1.0 / max(std, 1e-6)


def score_std(reward: RewardConfig, model_dir: str, prompts: list[str], responses: list[str]) -> float:
    return ModelScorer.from_config(reward, [Path(model_dir)]).score(prompts, responses).double().std().item()


def last_kl(ctx: StageContext, k: int) -> float | None:
    """kl/ref of round k's last RL step (metrics.jsonl)."""
    steps = [e for e in read_events(ctx.run_dir, "irl", tags={"irl/round": k}) if isinstance(e, StepRow)]
    return steps[-1].metrics.get("kl/ref") if steps else None


def update_discriminator(
    ctx: StageContext, k: int, init: str, rows: list[dict], new_head: bool
) -> tuple[str, dict[str, float]]:
    """Train the reward model from `init` (with a new score head if `new_head`) on (demonstration, policy sample)
    rows; -> (the new model's dir, its last-epoch metrics)."""
    out = ctx.stage_dir("irl") / f"round-{k}" / "discriminator"
    job = offline_job(
        ctx, "irl", "irl", init_dir=init, tokenizer_dir=init, out_dir=out, pair_loss="discriminator", new_head=new_head
    )
    job = replace(job, seed=ctx.cfg.run.seed + k)  # a new data order per round
    records = fit(
        ctx, f"irl/round-{k}", reward_loop, job, {"train": quiet(ray.data.from_items(rows))}, ctx.cfg.irl.max_failures
    )
    keys = {
        "loss/disc": "loss/disc",
        "disc/accuracy": "disc/accuracy",
        "disc/demo_score": "disc/demo_score",
        "disc/policy_score": "disc/policy_score",
    }
    metrics = last_epoch(records, keys)
    ctx.log(
        f"irl: round {k} discriminator accuracy {metrics.get('disc/accuracy', float('nan')):.3f} "
        f"on {len(rows)} (demonstration, policy sample) pairs"
    )
    return str(out / "member-0"), metrics


def rl_round(
    ctx: StageContext, k: int, round_dir: Path, policy: str | Path, disc: str, reference: Path, scale: float = 1.0
) -> tuple[str, list[dict[str, float]] | None]:
    """`irl.rl_steps` steps of `train_iter` from `policy` against the reward model `disc` (times `scale`), in its
    own context (run dir = round_dir), recorded in metrics.jsonl as stage `irl` steps numbered across rounds; -> (the
    new policy's dir, the held-out evaluations' metrics before and after; None when stopped before the last step)."""
    cfg, irl = ctx.cfg, ctx.cfg.irl
    round_cfg = cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"max_steps": irl.rl_steps}),
            "reference": cfg.reference.model_copy(update={"model": cfg.reference.model or reference}),
            "reward": cfg.reward.model_copy(
                update={"weights": {**cfg.reward.weights, "model": cfg.reward.weights.get("model", 1.0) * scale}}
            ),
        }
    )
    artifacts = Artifacts(
        task_dir=ctx.artifacts.task_dir, gold_reward=ctx.artifacts.gold_reward, policy=str(policy), reward=[disc]
    )
    round_ctx = StageContext(cfg=round_cfg, run_dir=round_dir, artifacts=artifacts, log=ctx.log, stop=ctx.stop)
    recorder = Recorder(
        ctx.run_dir,
        stage="irl",
        total_steps=irl.rounds * irl.rl_steps,
        offset=(k - 1) * irl.rl_steps,
        tags={"irl/round": k},
    )
    # A round cut off mid-RL resumes from its last checkpoint; what follows it comes again.
    resume = checkpoint.latest(round_ctx.stage_dir("rl") / "checkpoints")
    recorder.truncate(checkpoint.load_state(resume)["step"] if resume else -1)
    try:
        for event in train_iter(round_cfg, round_ctx, stop=ctx.stop):
            recorder.add(event)
    finally:
        recorder.close()
    if not recorder.finished:
        return str(round_ctx.stage_dir("rl") / "policy"), None
    # From the file, not the loop: a resumed round does not evaluate its start again.
    evals = [dict(e.metrics) for e in recorder.events() if isinstance(e, EvalRow)]
    return str(round_ctx.stage_dir("rl") / "policy"), evals


def irl_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json entries: gold and reward-model reward before round 1 and after the last round, and the
    discriminator's accuracy per round."""
    summary: dict[str, Any] = {"irl/rounds": len(rounds)}
    first, last = rounds[0]["evals"][0], rounds[-1]["evals"][-1]
    if "eval/gold_reward" in first:
        summary["gold_reward/initial"] = first["eval/gold_reward"]
        summary["gold_reward/final"] = last["eval/gold_reward"]
        summary["irl/gold_reward_by_round"] = [r["evals"][-1]["eval/gold_reward"] for r in rounds]
    summary["irl/disc_accuracy_by_round"] = [r["discriminator"].get("disc/accuracy") for r in rounds]
    summary["irl/kl_by_round"] = [r.get("kl") for r in rounds]
    summary["irl/reward_scale_by_round"] = [r.get("reward_scale", 1.0) for r in rounds]
    return summary

"""The online RL loop: `train_iter(cfg, ctx)` yields one dict of metrics per step (STYLE.md rule 5).

Dataflow per step: prompts come from a Ray Data stream; each chunk of prompts goes rollout -> reward ->
reference (-> critic) as chained actor calls, so chunk k+1 is generated while chunk k is scored; a Ray task
joins the chunks into advantages and one shard per learner; the learners update; the new weights go to every
rollout engine (version = step). The driver holds object refs and metrics, never a step's tensors.

Sync (on-policy) mode: every step samples with the weights of the step before. Async mode
(`rollout.async=true`): the experience of the next `rollout.max_staleness` steps is launched before this step
trains, so generation overlaps training and samples are up to that many updates old; the learners' clipped
ratio against the rollout logprobs, and `algo.tis_cap` (truncated importance weights), correct for it.
A resumed async run is not bit-identical to an uninterrupted one (the prefetched samples are redrawn with the
checkpoint's weights); a resumed sync run is.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline import checkpoint
from pipeline.algo import AdaptiveKLController, FixedKLController
from pipeline.config import Config
from pipeline.data import RowCheck, read_dataset
from pipeline.stages.context import StageContext


@dataclass
class RLState:
    """Everything a checkpoint holds besides the learners' engines."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # prompt batches of `epoch` already consumed
    kl: dict[str, float] = field(default_factory=dict)  # KL controller state


class PromptStream:
    """Batches of P training prompts from one Ray Data dataset, reshuffled per epoch with a seeded shuffle, with
    a position (epoch, batch) that a checkpoint records and a resume restores."""

    def __init__(self, ctx: StageContext, batch_size: int, seed: int):
        cfg = ctx.cfg
        check = RowCheck("prompts", tokenizer_dir=ctx.tokenizer_dir(), max_prompt_tokens=cfg.data.max_prompt_tokens,
                         max_response_tokens=cfg.data.max_response_tokens)
        path = ctx.data_file("prompts")
        self.train, report = read_dataset(path, check, on_bad_rows=cfg.data.on_bad_rows, split="train", log=ctx.log)
        self.test, _ = read_dataset(path, check, on_bad_rows="skip", split="test", log=lambda _: None)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the same seed gives the same prompt order
        context.enable_progress_bars = False
        self.batch_size, self.seed = batch_size, seed
        self._iter: Iterator | None = None

    def start(self, epoch: int, skip: int) -> None:
        self.epoch, self.batch_in_epoch = epoch, 0
        shuffled = self.train.random_shuffle(seed=self.seed + epoch)
        self._iter = iter(shuffled.iter_batches(batch_size=self.batch_size, batch_format="pandas", drop_last=True))
        for _ in range(skip):
            self.next()

    def next(self) -> list[str]:
        try:
            batch = next(self._iter)
        except StopIteration:
            self.start(self.epoch + 1, 0)
            batch = next(self._iter)
        self.batch_in_epoch += 1
        return list(batch["prompt"])

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it consumed): where a resume continues."""
        return self.epoch, self.batch_in_epoch

    def close(self) -> None:
        # A live Ray Data iterator finalized after ray.shutdown() would try to start Ray again at exit.
        self._iter = None

    def heldout(self, n: int) -> list[str]:
        return [row["prompt"] for row in self.test.take(n)]


class StepTimer:
    """Seconds per stage of a step, on the critical path: each `wait` charges the time since the last mark."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def wait(self, stage: str, refs: list) -> None:
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
        self.charge(stage)

    def call(self, stage: str, fn, *args):
        out = fn(*args)
        self.charge(stage)
        return out

    def charge(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.mark
        self.mark = now

    def metrics(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out["timing/other"] = total - sum(self.seconds.values())
        out["timing/step"] = total
        return out


def kl_controller(cfg: Config):
    kl = cfg.algo.kl
    if kl.controller == "adaptive":
        return AdaptiveKLController(kl.coef, target=kl.target, horizon=kl.horizon)
    return FixedKLController(kl.coef)


def step_seed(cfg: Config, step: int) -> int:
    """The sampling seed of a step (chunk c, prompt i use seed + 1000 c + i): samples depend on the run seed, the
    step and the weights only, not on what the engine sampled before, so a resumed run samples the same."""
    return random.Random(f"{cfg.run.seed}:{step}").getrandbits(30)


def train_iter(cfg: Config, ctx: StageContext, stop=None) -> Iterator[dict[str, Any]]:
    """Yield the metrics of every RL step until `run.max_steps`; resumes from the stage's last checkpoint.
    `stop()` returning a truthy value ends the loop cleanly after a checkpoint of the finished step."""
    from pipeline.rl_roles import Roles

    ckpt_root = ctx.stage_dir("rl") / "checkpoints"
    roles = Roles.start(cfg, ctx)
    stream = PromptStream(ctx, cfg.rollout.prompts_per_step, cfg.run.seed)
    state, kl_ctl = RLState(), kl_controller(cfg)
    resume_from = checkpoint.latest(ckpt_root)
    try:
        if resume_from is not None:
            state = RLState(**checkpoint.load_state(resume_from))
            kl_ctl.load_state_dict(state.kl)
            roles.load_checkpoint(resume_from, version=state.step)
            ctx.log(f"rl: resumed from {resume_from.name} (step {state.step})")
        stream.start(state.epoch, state.batch_in_epoch)
        if state.step == 0:
            yield {"step": 0, **roles.evaluate(stream.heldout(cfg.run.eval_prompts), seed=cfg.run.seed)}
        ahead = cfg.rollout.max_staleness if cfg.rollout.async_ else 0
        pending: deque[tuple[list, tuple[int, int]]] = deque()  # launched experience: (chunks, data position)
        for step in range(state.step + 1, cfg.run.max_steps + 1):
            timer = StepTimer()
            # step 1. the next P prompts from the Ray Data stream, launched through generate -> score ->
            # reference (-> values), chained per chunk so stages overlap; async mode launches `ahead` more steps,
            # which then sample while this step trains
            for launch in range(step + len(pending), min(step + ahead, cfg.run.max_steps) + 1):
                prompts = stream.next()
                pending.append((roles.experience(prompts, seed=step_seed(cfg, launch)), stream.position()))
            chunks, position = pending.popleft()
            timer.charge("data")
            # step 2. wait for this step's experience, stage by stage
            for stage in ("gen", "reward", "ref", "values"):
                timer.wait(stage, [getattr(c, stage) for c in chunks if getattr(c, stage) is not None])
            # step 3. advantages and one shard per learner, in a Ray task
            shards, experience = roles.assemble(chunks, kl_coef=kl_ctl.coef)
            timer.wait("advantage", [experience])
            # step 4. policy (and critic) update
            train_metrics = timer.call("train", roles.train, shards)
            # step 5. the new weights to every rollout engine
            timer.call("sync", roles.sync, step)
            # step 6. KL controller and the step's metrics
            metrics = {"step": step, **ray.get(experience), **train_metrics, "kl/coef": kl_ctl.coef}
            kl_ctl.update(metrics["kl/ref"], n_steps=int(metrics["samples"]))
            metrics.update(timer.metrics())
            metrics["samples_per_s"] = metrics["samples"] / metrics["timing/step"]
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["timing/step"]
            # step 7. checkpoint
            state = RLState(step, *position, kl_ctl.state_dict())
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.max_steps or (stop and stop()):
                roles.save_checkpoint(ckpt_root, asdict(state), keep=cfg.checkpoint.keep)
            yield metrics
            if stop and stop():
                return
        yield {"step": cfg.run.max_steps, "final": True,
               **roles.evaluate(stream.heldout(cfg.run.eval_prompts), seed=cfg.run.seed)}
        roles.save_policy(Path(ctx.stage_dir("rl")) / "policy")
    finally:
        stream.close()
        roles.shutdown()

"""The online RL loop: `train_iter(cfg, ctx)` yields one typed event per step and evaluation (STYLE.md rule 5).

Dataflow per step: the next P prompts come from a Ray Data read of the prompt file and are fed, in chunks, into
the experience stream (pipeline/stream.py: one long-lived Ray Data pipeline rollout -> reward -> reference
(-> critic) -> advantages, `streaming_split` across the learner ranks); each learner rank takes its chunks
from its split and updates; the new weights go to every rollout engine (version = step). The driver holds
prompts, chunk counts and metrics, never a step's tensors.

Sync (on-policy) mode: a step's prompts enter the stream only after the previous step's weight sync, so every
step samples with the weights of the step before. Async mode (`rollout.async=true`): the prompts of the next
`rollout.max_staleness` steps are fed before this step trains, so generation overlaps training and samples are
up to that many updates old; the learners' clipped ratio against the rollout logprobs, and `algo.tis_cap`
(truncated importance weights), correct for it. A resumed async run is not bit-identical to an uninterrupted
one (the prefetched samples are redrawn with the checkpoint's weights); a resumed sync run is.
"""

from __future__ import annotations

import queue
import random
import threading
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
from pipeline.data import read_dataset
from pipeline.errors import ConfigError, RunFailure
from pipeline.experience import stage_seconds
from pipeline.stages.context import StageContext
from pipeline.stages.heldout import heldout_rows, row_check
from pipeline.types import EvalRow, LoopEvent, Restart, StepRow


@dataclass
class RLState:
    """Everything a checkpoint holds besides the learners' engines."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # prompt batches of `epoch` already consumed
    kl: dict[str, float] = field(default_factory=dict)  # KL controller state


class PromptStream:
    """Batches of P training prompts from one Ray Data dataset, reshuffled per epoch with a seeded shuffle, with
    a position (epoch, batch) that a checkpoint records and a resume restores.

    A thread reads ahead: an epoch's shuffle is an all-to-all Ray Data execution that takes seconds on CPU, and
    read ahead it overlaps the actors' start-up and the steps instead of stalling them. The thread reads each
    epoch's shuffled prompts to the end (their text only; the all-to-all shuffle holds the whole epoch anyway) and
    hands them out a batch at a time, up to two batches ahead. No Ray Data iteration is left half-read: one
    abandoned mid-epoch keeps threads that touch Ray until garbage collection finalizes them, and one finalized
    during or after `ray.shutdown()` ends the process with exit code 1."""

    AHEAD = 2

    def __init__(self, ctx: StageContext, batch_size: int, seed: int):
        cfg = ctx.cfg
        check = row_check(ctx, "prompts", ctx.tokenizer_dir())
        path = ctx.data_file("prompts")
        self.path, self.ctx, self.tokenizer_dir = path, ctx, ctx.tokenizer_dir()
        self.train, report = read_dataset(path, check, on_bad_rows=cfg.data.on_bad_rows, split="train", log=ctx.log)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the same seed gives the same prompt order
        context.enable_progress_bars = False
        self.batch_size, self.seed = batch_size, seed
        self._reader: tuple[threading.Thread, queue.Queue, threading.Event] | None = None

    def start(self, epoch: int, skip: int) -> None:
        """Read from batch `skip` of `epoch` on (in the background)."""
        self.close()
        self.epoch, self.batch_in_epoch = epoch, skip
        batches: queue.Queue = queue.Queue(maxsize=self.AHEAD)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._read, args=(epoch, skip, batches, stop), daemon=True, name="prompt-stream"
        )
        self._reader = (thread, batches, stop)
        thread.start()

    def _read(self, epoch: int, skip: int, batches: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            while not stop.is_set():
                shuffled = self.train.random_shuffle(seed=self.seed + epoch)
                prompts = [row["prompt"] for row in shuffled.take_all()]
                n_batches = len(prompts) // self.batch_size  # the last partial batch is dropped
                if n_batches == 0:
                    raise ValueError(
                        f"{self.path}: fewer training prompts than rollout.prompts_per_step "
                        f"({self.batch_size}); expected at least one full batch"
                    )
                for n in range(skip + 1, n_batches + 1):
                    if not put((epoch, n, prompts[(n - 1) * self.batch_size : n * self.batch_size])):
                        return
                epoch, skip = epoch + 1, 0
        except BaseException as e:  # handed to the driver, which raises it from next()
            put(e)

    def next(self) -> list[str]:
        if self._reader is None:
            raise RuntimeError("PromptStream.next before start")
        item = self._reader[1].get()
        if isinstance(item, BaseException):
            raise item
        self.epoch, self.batch_in_epoch, prompts = item
        return prompts

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it consumed): where a resume continues."""
        return self.epoch, self.batch_in_epoch

    def close(self) -> None:
        """Stop the reader; it finishes the epoch read it is in (its Ray Data execution ends, before Ray does)."""
        if self._reader is not None:
            thread, _, stop = self._reader
            stop.set()
            thread.join()
            self._reader = None

    def heldout(self, n: int) -> list[str]:
        """The first n test-split prompts (every prompt is held out too when the file has no split column)."""
        rows = heldout_rows(self.ctx, "prompts", self.tokenizer_dir, unsplit="all", limit=n)
        return [row["prompt"] for row in rows]


class StepTimer:
    """Seconds per stage of a step, on the critical path: each `charge` gives the time since the last mark to
    one stage; `charge_split` spreads it over several (the stream's stages, which overlap). Wall-clock time, so
    times taken in actors on the same machine compare."""

    def __init__(self):
        self.start = self.mark = time.time()
        self.seconds: dict[str, float] = {}

    def call(self, stage: str, fn, *args):
        out = fn(*args)
        self.charge(stage)
        return out

    def charge(self, stage: str, until: float | None = None) -> None:
        now = time.time() if until is None else until
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.mark
        self.mark = now

    def charge_split(self, seconds: dict[str, float], until: float) -> None:
        for stage, s in seconds.items():
            if s > 0:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + s
        self.mark = until

    def metrics(self) -> dict[str, float]:
        total = time.time() - self.start
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out["timing/other"] = total - sum(self.seconds.values())
        out["timing/step"] = total
        return out


def kl_controller(cfg: Config):
    kl = cfg.algo.kl
    if kl.controller == "adaptive":
        if kl.target is None:  # the config's cross-checks require one
            raise ConfigError("algo.kl.target is required when algo.kl.controller=adaptive")
        return AdaptiveKLController(kl.coef, target=kl.target, horizon=kl.horizon)
    return FixedKLController(kl.coef)


def step_seed(cfg: Config, step: int) -> int:
    """The sampling seed of a step (chunk c, prompt i use seed + 1000 c + i): samples depend on the run seed, the
    step and the weights only, not on what the engine sampled before, so a resumed run samples the same."""
    return random.Random(f"{cfg.run.seed}:{step}").getrandbits(30)


def train_iter(cfg: Config, ctx: StageContext, stop=None) -> Iterator[LoopEvent]:
    """Yield the events of the RL loop until `run.max_steps`; resumes from the stage's last checkpoint:
    `EvalRow(0, ...)` (the held-out evaluation before step 1, when starting from step 0), one `StepRow` per step,
    then `EvalRow(max_steps, ..., final=True)` (the evaluation after the last step). `stop()` returning a truthy
    value ends the loop cleanly after a checkpoint of the finished step (no final evaluation).

    An actor that dies for good (a learner rank; a rollout, reward or reference actor out of restarts) ends the
    attempt. With `run.max_failures` left, every role starts again from the last complete checkpoint, after a
    `Restart(s, n)` telling the consumer that what came after step s comes again; else RunFailure."""
    ckpt_root = ctx.stage_dir("rl") / "checkpoints"
    restarts = [0]  # worker restarts of the attempts so far: `faults/restarts` counts the whole run
    for failures in range(cfg.run.max_failures + 1):
        try:
            yield from _attempt(cfg, ctx, stop, restarts)
            return
        except ray.exceptions.RayActorError as e:
            last = checkpoint.latest(ckpt_root)
            where = f"the last complete checkpoint {last}" if last else "the start of the stage (no checkpoint yet)"
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if failures == cfg.run.max_failures:
                raise RunFailure(
                    f"rl: an actor died ({cause}); after {failures} restart(s) (run.max_failures="
                    f"{cfg.run.max_failures}) the run stops; `raylign run --resume RUN_DIR` continues "
                    f"from {where}"
                ) from e
            ctx.log(
                f"rl: an actor died ({cause}); restarting every role from {where} "
                f"(restart {failures + 1} of run.max_failures={cfg.run.max_failures})"
            )
            yield Restart(checkpoint.load_state(last)["step"] if last else 0, failures + 1)


def _attempt(cfg: Config, ctx: StageContext, stop, restarts: list[int]) -> Iterator[LoopEvent]:
    from pipeline.rl_roles import Roles

    ckpt_root = ctx.stage_dir("rl") / "checkpoints"
    prompt_stream = PromptStream(ctx, cfg.rollout.prompts_per_step, cfg.run.seed)  # bad data fails before start-up
    state, kl_ctl = RLState(), kl_controller(cfg)
    resume_from = checkpoint.latest(ckpt_root)
    if resume_from is not None:
        state = RLState(**checkpoint.load_state(resume_from))
        kl_ctl.load_state_dict(state.kl)
    prompt_stream.start(state.epoch, state.batch_in_epoch)  # reads ahead while the actors start
    try:
        roles = Roles.start(cfg, ctx)
    except BaseException:
        prompt_stream.close()
        raise
    roles.restarts_before = restarts[0]
    try:
        if resume_from is not None:
            roles.load_checkpoint(resume_from, version=state.step)
            ctx.log(f"rl: resumed from {resume_from.name} (step {state.step})")
        if state.step == 0:
            yield EvalRow(0, roles.evaluate(prompt_stream.heldout(cfg.run.eval_prompts), seed=cfg.run.seed))
        ahead = cfg.rollout.max_staleness if cfg.rollout.async_ else 0
        positions: deque[tuple[int, int]] = deque()  # data position after each step fed but not trained
        fed, bad_in_a_row = state.step, 0
        for step in range(state.step + 1, cfg.run.max_steps + 1):
            timer = StepTimer()
            # step 1. the next P prompts from the Ray Data read, fed into the experience stream; async mode
            # feeds `ahead` more steps, which then sample while this step trains
            while fed < min(step + ahead, cfg.run.max_steps):
                fed += 1
                roles.feed(fed, prompt_stream.next(), seed=step_seed(cfg, fed), kl_coef=kl_ctl.coef)
                positions.append(prompt_stream.position())
            position = positions.popleft()
            timer.charge("data")
            # step 2. every learner rank takes its chunks of this step from its split, then the policy ranks and
            # (PPO) the critic ranks update on them; the wait for the chunks is split among the stream's stages
            trained = roles.train(step)
            ready = max(trained.ready, timer.mark)  # async: it may have been waiting before the step began
            timer.charge_split(stage_seconds(trained.intervals, timer.mark, ready), until=ready)
            timer.charge("train")
            # step 3. the new weights to every rollout engine
            synced = timer.call("sync", roles.sync, step)
            # step 4. KL controller and the step's metrics
            metrics = {**trained.metrics, "kl/coef": kl_ctl.coef, "sync/bytes": float(synced)}
            bad = sorted(k.removeprefix("bad/") for k in metrics if k.startswith("bad/") and k != "bad/skipped")
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            if not bad:
                kl_ctl.update(metrics["kl/ref"], n_steps=int(metrics["samples"]))
            metrics.update(timer.metrics())
            metrics["samples_per_s"] = metrics["samples"] / metrics["timing/step"]
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["timing/step"]
            # step 5. checkpoint
            state = RLState(step, *position, kl_ctl.state_dict())
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.max_steps or (stop and stop()):
                roles.save_checkpoint(ckpt_root, asdict(state), keep=cfg.checkpoint.keep)
            yield StepRow(step, metrics)
            if bad_in_a_row >= cfg.run.max_bad_steps:
                last = checkpoint.latest(ckpt_root)
                raise RunFailure(
                    f"rl step {step}: non-finite {' and '.join(bad)} for {bad_in_a_row} steps in a row "
                    f"(run.max_bad_steps={cfg.run.max_bad_steps}); no update was made in them; last complete "
                    f"checkpoint: {last if last else 'none'}"
                )
            if stop and stop():
                return
        yield EvalRow(
            cfg.run.max_steps,
            roles.evaluate(prompt_stream.heldout(cfg.run.eval_prompts), seed=cfg.run.seed),
            final=True,
        )
        roles.save_policy(Path(ctx.stage_dir("rl")) / "policy")
    finally:
        prompt_stream.close()
        try:  # the board outlives a dead learner; its count carries over to the next attempt
            restarts[0] = roles.restarts_before + roles.restarts()
        except ray.exceptions.RayError:
            pass
        roles.shutdown()

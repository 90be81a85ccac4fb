"""Driver side of the offline training stages (`sft`, `reward`, `dpo`): check and stream the data, run a worker loop
of actors.training.offline on Ray Train (a TorchTrainer, one DeepSpeed engine per worker), print its per-epoch progress,
and draw and rate the policy's own samples. Held-out reads and measurements are in pipeline.stages.heldout.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.rollout import RolloutWorker
from actors.training.offline import OfflineJob
from cluster.plan import RolePlan, offline_threads, resolve_device, spawn
from pipeline.config import RolloutConfig
from pipeline.data import read_dataset
from pipeline.errors import ConfigError, Interrupted
from pipeline.progress import EVERY_S, format_seconds, get_with_progress, with_lines
from pipeline.stages.context import StageContext
from pipeline.stages.heldout import quiet, row_check
from pipeline.types import PromptBatch

POLL_S = 0.5  # how often the progress printer looks for a finished fit
TRAINING_SILENCE_S = 28.0  # > rank 0's PROGRESS_S (20 s) between its lines, < the 30 s a phase may stay silent


def offline_job(ctx: StageContext, stage: str, key: str, *, init_dir, tokenizer_dir, out_dir, **extra) -> OfflineJob:
    """The job of an offline stage: the `learner` settings with the stage section's (`key`) lr, epochs and token
    budget, the workers' torch threads (cluster.plan.offline_threads), its batch size (checked against the worker
    count) and the run seed."""
    section = getattr(ctx.cfg, key)
    check_batch_size(f"{key}.batch_size", section.batch_size, ctx.cfg.learner.num_workers)
    return OfflineJob(
        stage=stage,
        learner=ctx.cfg.learner.model_copy(
            update={
                "lr": section.lr,
                "epochs": section.epochs,
                "max_tokens_per_micro_batch": section.max_tokens_per_micro_batch,
                "packing": ctx.cfg.learner.packing if section.packing is None else section.packing,
                "cpu_threads": offline_threads(ctx.cfg),
            }
        ),
        init_dir=str(init_dir),
        tokenizer_dir=str(tokenizer_dir),
        out_dir=str(out_dir),
        batch_size=section.batch_size,
        seed=ctx.cfg.run.seed,
        lora=ctx.cfg.lora_for(key),
        lr_schedule=section.lr_schedule,
        **extra,
    )


def check_batch_size(key: str, batch_size: int, num_workers: int) -> None:
    """Every worker takes batch_size / num_workers rows per update: the global batch, hence the update, does not
    depend on the number of workers."""
    if batch_size % num_workers:
        raise ConfigError(
            f"{key} = {batch_size} does not split into learner.num_workers = {num_workers} equal worker shares"
        )


def train_dataset(ctx: StageContext, kind: str, tokenizer_dir: Path) -> ray.data.Dataset:
    """The checked train split of `data.<kind>` (all rows when the file has no `split` column)."""
    return train_split(ctx, kind, tokenizer_dir)[0]


def train_split(ctx: StageContext, kind: str, tokenizer_dir: Path) -> tuple[ray.data.Dataset, int]:
    """`train_dataset` and its row count, from the file check (which read every row already): `fit` need not run
    the dataset to count it."""
    check = row_check(ctx, kind, tokenizer_dir)
    path, on_bad_rows = ctx.data_file(kind), ctx.cfg.data.on_bad_rows
    ds, report = read_dataset(path, check, on_bad_rows=on_bad_rows, split="train", log=ctx.log)
    ctx.log(f"data: {report.path}: {report.good_rows} good rows of {report.rows} ({kind})")
    quiet(ds)
    return ds, report.rows_of_split("train")


def fit(
    ctx: StageContext,
    stage: str,
    loop: Callable,
    job: Any,
    datasets: dict[str, Any],
    max_failures: int,
    rows: dict[str, int] | None = None,
):
    """Run `loop` on `learner.num_workers` Ray Train workers with `job` (a training.offline.OfflineJob without its
    progress queue). `rows`: the datasets' row counts where the caller knows them (train_split); the others are
    counted, which runs them once more. -> the per-epoch records rank 0 sent, also written to
    <stage dir>/epochs.jsonl."""
    from dataclasses import replace

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    stage_dir = ctx.stage_dir(stage)
    queue = Queue(actor_options={"num_cpus": 0})
    records: list[dict[str, Any]] = []
    done = threading.Event()
    printer = threading.Thread(
        target=_print_progress, args=(stage, queue, records, done, ctx.log, stage_dir), daemon=True
    )
    known, workers = rows or {}, ctx.cfg.learner.num_workers
    counts = {name: known[name] if name in known else datasets[name].count() for name in datasets}
    per_epoch = tuple(updates_per_epoch(counts[name], job.batch_size, workers) for name in job.datasets)
    trainer = stoppable(TorchTrainer)(
        loop,
        train_loop_config={"job": replace(job, progress=queue, updates_per_epoch=per_epoch)},
        scaling_config=ScalingConfig(num_workers=ctx.cfg.learner.num_workers, use_gpu=resolve_device(ctx.cfg) == "gpu"),
        run_config=RunConfig(
            name="train",
            storage_path=str(stage_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ctx.cfg.checkpoint.keep),
        ),
        datasets=datasets,
    )
    printer.start()
    # Ray Train's fit puts a SIGINT handler of its own in the main thread and leaves it there, holding its controller
    # actor: the run's handler (stop at a clean point) would be gone for the later stages, and the finished
    # controller would live to the end of the run. The run's handler goes back after fit.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except Exception:
        if not trainer.interrupted:  # else the aborted controller's error: Interrupted below says what happened
            raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        done.set()
        printer.join()
        ray.kill(queue.actor)
    if trainer.interrupted:
        raise Interrupted(signal.SIGINT)
    return records


def stoppable(trainer_class: type) -> type:
    """`trainer_class` (Ray Train's TorchTrainer) with a SIGINT handler for its run that stops it as the run's
    Ctrl-C does: the run's handler gets the signal first (its line; a second Ctrl-C stops at once), then the
    controller aborts the workers, and `interrupted` is set so that fit raises Interrupted rather than hand a
    half-trained model to the rest of the stage. `raylign run --resume` restarts the stage from its last epoch
    checkpoint. Ray Train's own handler only aborts: fit then returns as if training had finished."""

    class Stoppable(trainer_class):
        interrupted = False

        def _register_sigint_handler(self, controller) -> None:
            run_handler = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame) -> None:
                if callable(run_handler):
                    run_handler(signum, frame)
                if not self.interrupted:
                    self.interrupted = True
                    with contextlib.suppress(ray.exceptions.RayActorError):  # the controller exits as it aborts
                        ray.get(controller.abort.remote())

            signal.signal(signal.SIGINT, on_sigint)

    return Stoppable


def _print_progress(
    stage: str, queue, records: list, done: threading.Event, log: Callable[[str], None], stage_dir: Path
) -> None:
    """Print what rank 0 reports; while it reports nothing (Ray Train starting its workers, a long first update),
    a line every EVERY_S seconds says so."""
    from ray.util.queue import Empty

    start = last = time.perf_counter()
    heard = False  # from rank 0, once
    with (stage_dir / "epochs.jsonl").open("a") as f:
        while True:
            try:
                record = queue.get(timeout=POLL_S)
            except Empty:
                if done.is_set() and queue.empty():
                    return
                # once rank 0 reports (every PROGRESS_S), a line of ours only when its next one is late
                if time.perf_counter() - last >= (TRAINING_SILENCE_S if heard else EVERY_S):
                    last = time.perf_counter()
                    what = "training" if heard else "starting the Ray Train workers"
                    log(f"{stage}: {what} ({format_seconds(last - start)})")
                continue
            last, heard = time.perf_counter(), True
            if record.get("kind") == "progress":
                log(describe_progress(record))
                continue
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            log(describe(record))


def updates_per_epoch(rows: int, batch_size: int, workers: int) -> int:
    """Optimizer updates in one epoch: Ray Train gives each of `workers` ranks rows // workers rows (equal shards),
    which each rank takes in batches of batch_size // workers, the last one partial."""
    per_rank = max(1, batch_size // workers)
    return -(-(rows // workers) // per_rank)


def describe_progress(record: dict[str, Any]) -> str:
    """One line within an epoch: `reward: member 0 epoch 1/1 update 120/2560 (5%) eta 17m 30s 2.32 updates/s
    loss/bt 0.6512`; at the first update, which has no rate yet, `... update 1/2560 (0%) loss/bt 0.6931`."""
    member = f" member {record['member']}" if record["stage"] == "reward" else ""
    done, total, rate = record["updates"], record["of"], record["rate"]
    where = f"update {done}"
    if total:
        eta = f" eta {format_seconds((total - done) / rate)}" if rate else ""
        where = f"update {done}/{total} ({100 * done / total:.0f}%){eta}"
    losses = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
    epoch = f"epoch {record['epoch']}/{record['epochs']}"
    speed = "" if rate is None else f" {rate:.2f} updates/s"
    return f"{record['stage']}:{member} {epoch} {where}{speed} {losses}".rstrip()


def describe(record: dict[str, Any]) -> str:
    """One progress line: `sft: epoch 1/2 loss/sft 1.234 ... (12 updates, 3.1 s)`."""
    member = f" member {record['member']}" if record["stage"] == "reward" else ""
    keys = [k for k in record if k.startswith("loss/") or k.endswith("accuracy")]
    values = " ".join(f"{k} {record[k]:.4f}" for k in keys)
    return (
        f"{record['stage']}:{member} epoch {record['epoch']}/{record['epochs']} {values} "
        f"({record['updates']} updates, {record['seconds']:.1f} s)"
    )


SAMPLING_CALLS = 10  # policy sampling in about this many engine calls: a progress line can come between them


def policy_samples(
    rollout: RolloutConfig,
    policy: str | Path,
    prompts: list[str],
    samples_per_prompt: int,
    *,
    seed: int,
    log: Callable[[str], None] | None = None,
    what: str = "sampling",
) -> list[str]:
    """`samples_per_prompt` responses per prompt ([P * G], a prompt's consecutive) from a rollout worker on `policy`
    with the configured engine, as a Ray actor that is gone afterwards. The prompts go in a few chunks of at least
    `rollout.chunk_size`; prompt i keeps the seed seed + i (vLLM seeds each prompt), so chunking changes nothing."""
    one = RolePlan("rollout", "rollout", [{"CPU": 1.0}])  # outside any placement group
    worker = spawn(RolloutWorker, one, None, [(rollout, Path(policy))], {"seed": seed})[0]
    size = max(rollout.chunk_size, -(-len(prompts) // SAMPLING_CALLS))
    starts = range(0, len(prompts), size)
    try:
        setup = worker.setup.remote()
        if log:
            log(f"{what}: {len(prompts)} prompts x {samples_per_prompt}")
            with_lines(lambda: ray.get(setup), log, f"{what}: starting the {rollout.engine} engine")
        else:
            ray.get(setup)
        refs = [
            worker.generate.remote(PromptBatch(prompts[i : i + size], samples_per_prompt, seed=seed + i))
            for i in starts
        ]
        batches = get_with_progress(refs, log, what, "chunks") if log else ray.get(refs)
        return [r for b in batches for r in b.responses]
    finally:
        ray.kill(worker)


def demonstration_pairs(demos: list[dict], samples: list[str], earlier: list[list[str]], *, seed: int) -> list[dict]:
    """(demonstration, policy sample) rows of one prompt each: every demonstration against this round's sample,
    and, with earlier rounds, against one sample of a randomly drawn earlier round as well. The replay keeps the
    discriminator from forgetting what the policy did before, so the policy cannot go back to an old exploit
    (GAIL's replay of past policies); the pair count stays 2x the demonstrations however many rounds there are."""
    rows = [
        {"prompt": d["prompt"], "chosen": d["response"], "rejected": s} for d, s in zip(demos, samples, strict=True)
    ]
    if earlier:
        rng = random.Random(seed)
        rows += [
            {"prompt": d["prompt"], "chosen": d["response"], "rejected": rng.choice(earlier)[i]}
            for i, d in enumerate(demos)
        ]
    return rows


def rated_policy_pairs(ctx: StageContext, policy: Path, pairs_per_prompt: int, *, key: str) -> ray.data.Dataset:
    """Pairs of `policy`'s own samples (two per pair) on the training prompts, labelled by the synthetic task's
    simulated raters (the Bradley-Terry raters behind preferences.parquet): preference data collected where the
    policy puts its mass, as human labels of a policy's samples are. `key` (e.g. `dpo.pairs`) names the setting in
    the error and the progress line. -> rows (prompt, chosen, rejected)."""
    from pipeline.tasks.synthetic import rate_pairs

    info = task_info(ctx)
    if "label_temperature" not in info:
        raise ConfigError(f"{key}=policy needs the synthetic task's raters: run a `synth` stage first")
    cfg, n = ctx.cfg, pairs_per_prompt
    prompts = [r["prompt"] for r in train_dataset(ctx, "prompts", ctx.tokenizer_dir()).take_all()]
    samples = policy_samples(
        cfg.rollout, policy, prompts, 2 * n, seed=cfg.run.seed, log=ctx.log, what=f"{key}: sampling {policy}"
    )  # [P * 2n]
    pair_prompts = [p for p in prompts for _ in range(n)]
    rows = rate_pairs(
        pair_prompts, samples[0::2], samples[1::2], temperature=info["label_temperature"], seed=cfg.run.seed
    )
    ctx.log(f"{key}: {len(rows)} pairs of {policy} samples on {len(prompts)} prompts, labelled by the task's raters")
    return quiet(ray.data.from_items(rows))


def task_info(ctx: StageContext) -> dict[str, Any]:
    """task.json of the synthetic task, or {} when the run has none."""
    if ctx.artifacts.task_dir is None:
        return {}
    path = Path(ctx.artifacts.task_dir) / "task.json"
    return json.loads(path.read_text()) if path.exists() else {}


def last_epoch(records: list[dict[str, Any]], keys: dict[str, str], member: int = 0) -> dict[str, float]:
    """Summary entries {summary key: value} from the last epoch record of `member` (none after a resume that had
    no epoch left to train)."""
    mine = [r for r in records if r["member"] == member]
    return {out: mine[-1][key] for key, out in keys.items()} if mine else {}

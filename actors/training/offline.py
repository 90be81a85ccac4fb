"""Offline training on Ray Train: the per-worker loops of the `sft`, `reward` and `dpo` stages (and the `irl`
stage's discriminator updates, which are reward-model training with another pair loss).

Each Ray Train worker is one data-parallel rank with a DeepSpeed (or plain torch) engine (actors/training/engine.py), in
the process group Ray Train set up. Rows arrive as clean strings from `ray.train.get_dataset_shard`; a rank tokenizes
its share of each global batch (`batch_size / world_size` rows) and takes one optimizer update with
`accumulate_update`, so an update is the full-batch one whatever the number of workers.

After every epoch each rank saves its part of the engine checkpoint and reports it to Ray Train, which merges the
parts; a worker group restarted under the FailureConfig resumes from the last one. Rank 0 puts one record per
epoch on a queue that the driver prints. Pairs (reward, dpo) are interleaved: row 2i is pair i's chosen response,
row 2i+1 its rejected one, and a micro-batch plan never splits a pair.

Forwards are padding-free unless learner.packing is off (or the model fails the packing probe): causal LMs (sft,
dpo) in actors.sequences' packed layout, reward models (reward, irl) in actors.scoring's packed rows. Micro-batches
hold learner.micro_batch_size rows, or up to the stage section's max_tokens_per_micro_batch tokens; the loss is
weighted over the whole update either way, so the update is the padded, full-batch one.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from actors.hf import load_frozen_model
from actors.sequences import micro_batches, split_to, token_metrics
from actors.training.engine import TrainEngine, build_engine, save_hf
from actors.training.lora import ADAPTER_SUFFIX, add_adapters
from actors.training.objectives import (
    PAIR_AGG,
    Objective,
    ScoreBatch,
    SequenceBatch,
    dpo_objective,
    pair_sequence_batch,
    score_batch,
    score_objective,
    sequence_batch,
    sft_objective,
)
from actors.training.update import accumulate_update, global_max, global_sum, mean_metrics
from pipeline.batches import to_device
from pipeline.config import DpoConfig, LearnerConfig, LoraConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor

STATE = "offline_state.json"  # in each checkpoint: {"member": k, "epochs_done": e}
PROGRESS_S = 20.0  # rank 0 reports the updates done within an epoch at least this often
SHUFFLE_ROWS = 4096  # local shuffle buffer: the whole of a tiny dataset, a window of a large one


@dataclass(frozen=True)
class OfflineJob:
    """What every worker of one offline stage gets: its slice of the config and the paths."""

    stage: str  # "sft", "reward", "dpo" or "irl": the prefix of progress lines
    learner: LearnerConfig  # with the stage's lr and epochs
    init_dir: str  # the model to start from
    tokenizer_dir: str
    out_dir: str  # the exported HF dir; for the reward stage the parent of member-k dirs
    batch_size: int  # rows (demos or pairs) per optimizer update, over all workers
    seed: int
    progress: Any = None  # ray.util.queue.Queue of per-epoch records (and progress within one), read by the driver
    updates_per_epoch: tuple[int, ...] = ()  # per member's dataset: optimizer updates in one epoch (for the ETA)
    members: int = 1  # reward: ensemble members, trained one after the other
    datasets: tuple[str, ...] = ("train",)  # dataset name per member (bootstrap: one resample each)
    lr_schedule: str = "constant"  # the stage's: "linear" decays the LR over epochs x updates_per_epoch[member]
    reference_dir: str | None = None  # dpo: the frozen reference policy
    dpo: DpoConfig | None = None
    pair_loss: str = "bt"  # reward: a key of PAIR_LOSSES
    new_head: bool = True  # reward: draw the score head afresh (False: continue a trained reward model)
    lora: LoraConfig | None = None  # rank > 0: train LoRA adapters (and a reward model's head) only


# ---- the worker loops (Ray Train `train_loop_per_worker`, config {"job": OfflineJob}) ----


def sft_loop(config: dict[str, Any]) -> None:
    job: OfflineJob = config["job"]
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)

    def objective(engine: TrainEngine, quiet: bool) -> Objective:
        return sft_objective(engine, job.learner.packing, quiet=quiet)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(job.init_dir, dtype=torch.float32)

    def collate(rows: dict) -> SequenceBatch:
        return sequence_batch(tokenizer, list(rows["prompt"]), list(rows["response"]))

    train_member(job, 0, load, collate, objective, agg="token-mean", out_dir=Path(job.out_dir))


def reward_loop(config: dict[str, Any]) -> None:
    job: OfflineJob = config["job"]
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def load() -> torch.nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(job.init_dir, num_labels=1, dtype=torch.float32)
        # HF pools each row at its last non-pad token: it needs the pad id, and so does anyone loading the export.
        model.config.pad_token_id = tokenizer.pad_token_id
        if job.new_head:
            redraw_head(model)
        return model

    def objective(engine: TrainEngine, quiet: bool) -> Objective:
        return score_objective(engine, job.learner.packing, job.pair_loss, who=job.stage, quiet=quiet)

    def collate(rows: dict) -> ScoreBatch:
        return score_batch(tokenizer, list(rows["prompt"]), list(rows["chosen"]), list(rows["rejected"]))

    for k in range(job.members):
        out = Path(job.out_dir) / f"member-{k}"
        train_member(job, k, load, collate, objective, agg=PAIR_AGG, out_dir=out, pairs=True)


def dpo_loop(config: dict[str, Any]) -> None:
    job: OfflineJob = config["job"]
    dpo = job.dpo
    if dpo is None or job.reference_dir is None:
        raise ValueError("a dpo job needs its dpo section and reference_dir")
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    reference = load_frozen_model(AutoModelForCausalLM, Path(job.reference_dir))

    def objective(engine: TrainEngine, quiet: bool) -> Objective:
        return dpo_objective(engine, reference, dpo, job.learner.packing, quiet=quiet)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(job.init_dir, dtype=torch.float32)

    def collate(rows: dict) -> SequenceBatch:
        return pair_sequence_batch(tokenizer, list(rows["prompt"]), list(rows["chosen"]), list(rows["rejected"]))

    train_member(job, 0, load, collate, objective, agg=PAIR_AGG, out_dir=Path(job.out_dir), pairs=True)


def redraw_head(model: PreTrainedModel) -> None:
    """Draw a sequence-classification model's `score` head afresh from the torch seed, so ensemble members
    started from one saved model differ (Llama-family heads are `score`; others keep from_pretrained's init)."""
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.weight.normal_(0.0, model.config.initializer_range)
            if head.bias is not None:
                head.bias.zero_()


# ---- one model trained over the epochs, with checkpoints, resume and export ----


def train_member(
    job: OfflineJob,
    member: int,
    load_model: Callable[[], torch.nn.Module],
    collate: Callable[[dict], Any],
    objective: Callable[[TrainEngine, bool], Objective],
    *,
    agg: str,
    out_dir: Path,
    pairs: bool = False,
) -> None:
    """Train one model for `job.learner.epochs` epochs (resuming after the last reported checkpoint), then have
    rank 0 export it as an HF dir with the tokenizer. objective(engine, quiet) gives the loss and the layout's token
    count (quiet on every rank but the first: one log line should a layout fall back)."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    state, checkpoint = restored_state()
    if state is not None and state["member"] > member:
        return  # finished and exported before the restart
    join_process_group(job.learner)
    seed = job.seed + member
    torch.manual_seed(seed)  # every rank loads the same model (a new head starts identical)
    model = load_model()
    if job.lora is not None and job.lora.rank > 0:
        model = add_adapters(model, job.lora)
    total = job.updates_per_epoch[member] if member < len(job.updates_per_epoch) else None
    learner = job.learner
    if job.lr_schedule == "linear" and total is not None:
        learner = learner.model_copy(update={"lr_decay_steps": total * learner.epochs})
    engine = build_engine(learner, model, rank, world)
    first_epoch = 0
    if state is not None and state["member"] == member:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(Path(d) / "engine")
        first_epoch = state["epochs_done"]
    shard = ray.train.get_dataset_shard(job.datasets[member])
    group = 2 if pairs else 1  # a pair's two rows share a micro-batch: the pair losses read scores[0::2], [1::2]
    goal = objective(engine, rank > 0)
    for epoch in range(first_epoch, job.learner.epochs):
        start, metrics, rows = time.perf_counter(), [], 0
        reported, reported_updates = start, 0
        for batch in epoch_batches(shard, job.batch_size // world, seed=seed * 1000 + epoch):
            batch = collate(batch)
            m = offline_update(engine, batch, goal, job.learner, world, agg=agg, group=group)
            if any(k.startswith("bad/") for k in m):  # a non-finite batch: skipped on every rank
                raise FloatingPointError(f"{job.stage}: epoch {epoch + 1}: non-finite {', '.join(m)}; no update made")
            metrics.append(m)
            rows += len(batch) // (2 if pairs else 1)
            now = time.perf_counter()
            rate = None
            if len(metrics) == 1:  # rates count from the end of the first update, which also paid the start-up
                reported, reported_updates = now, 1
            elif now - reported >= PROGRESS_S:  # the rate of the last interval
                rate = (len(metrics) - reported_updates) / (now - reported)
                reported, reported_updates = now, len(metrics)
            # a line at the member's first update (the driver's "starting" lines end there), then every PROGRESS_S
            first = len(metrics) == 1 and epoch == first_epoch
            if rank == 0 and job.progress is not None and (first or rate is not None):
                job.progress.put(
                    {
                        "kind": "progress",
                        "stage": job.stage,
                        "member": member,
                        "epoch": epoch + 1,
                        "epochs": job.learner.epochs,
                        "updates": len(metrics),
                        "of": total,
                        "rate": rate,
                        **mean_metrics(metrics[-10:]),
                    }
                )
        record = {
            **mean_metrics(metrics),
            "member": member,
            "epoch": epoch + 1,
            "epochs": job.learner.epochs,
            "rows": rows * world,
            "updates": len(metrics),
            "step": engine.steps,  # optimizer updates since the start, across restarts
            "seconds": time.perf_counter() - start,
        }
        report_epoch(engine, rank, {"member": member, "epochs_done": epoch + 1}, record)
        if rank == 0 and job.progress is not None:
            job.progress.put({"stage": job.stage, **record})
    save_hf(engine, rank, Path(job.tokenizer_dir), out_dir, out_dir.with_name(out_dir.name + ADAPTER_SUFFIX))
    del engine
    gc.collect()


def offline_update(
    engine: TrainEngine,
    batch: SequenceBatch | ScoreBatch,
    goal: Objective,
    cfg: LearnerConfig,
    world_size: int,
    *,
    agg: str,
    group: int,
) -> dict[str, float]:
    """One optimizer update over this rank's share of a global batch, in the micro-batches of offline_plan, the
    loss weighted over the whole step (accumulate_update) -> its metrics with the step's token counts."""
    lengths = batch.lengths()
    plan = offline_plan(lengths, cfg, goal.tokens, world_size, engine.device, group=group)
    batch = to_device(batch, engine.device)
    m = accumulate_update(engine, batch, plan=plan, agg=agg, world_size=world_size, loss_fn=goal.loss)
    return (
        m
        if any(k.startswith("bad/") for k in m)
        else {**m, **summed_tokens(lengths, plan, goal, world_size, engine.device)}
    )


def offline_plan(
    lengths: Tensor,
    cfg: LearnerConfig,
    tokens: Callable[[Tensor], int],
    world_size: int,
    device: torch.device,
    *,
    group: int,
) -> list[Tensor]:
    """This rank's micro-batches of one update (index tensors over its B rows): `cfg.micro_batch_size` rows each,
    or up to `cfg.max_tokens_per_micro_batch` tokens by `tokens` (first-fit decreasing, actors.sequences), with
    as many micro-batches as the rank with the most (a collective). Consecutive runs of `group` rows (a pair) are
    one unit: never split, counted together.

    lengths: [B, k] real tokens per row (SequenceBatch.lengths: k = 2; ScoreBatch.lengths: k = 1)."""
    k, budget = lengths.shape[1], cfg.max_tokens_per_micro_batch
    units = lengths.reshape(len(lengths) // group, group * k)  # one row per unit: its rows' lengths side by side

    def unit_tokens(u: Tensor) -> int:
        return tokens(u.reshape(-1, k))

    plan = micro_batches(units, rows=max(1, cfg.micro_batch_size // group), max_tokens=budget, tokens=unit_tokens)
    if budget is not None:  # row counts give every rank's equal batch the same number already
        plan = split_to(plan, global_max(len(plan), world_size, device), units, unit_tokens)
    offsets = torch.arange(group)
    return [(idx[:, None] * group + offsets).reshape(-1) for idx in plan]


def summed_tokens(
    lengths: Tensor, plan: list[Tensor], goal: Objective, world_size: int, device: torch.device
) -> dict[str, float]:
    """`tokens/real` and `tokens/computed` (actors.sequences.token_metrics, by the objective's layout) of one
    update, summed over the ranks."""
    counts = token_metrics(lengths, plan, goal)
    total = global_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=device), world_size)
    return dict(zip(counts, total.tolist(), strict=True))


def join_process_group(cfg: LearnerConfig) -> None:
    """Ray Train already runs torch.distributed (gloo on CPU, NCCL on GPU) with RANK, LOCAL_RANK, MASTER_ADDR set;
    DeepSpeed adopts that group rather than starting one (engine.init_distributed would reset LOCAL_RANK)."""
    if cfg.backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def epoch_batches(shard, rows_per_rank: int, *, seed: int) -> Iterator[dict]:
    """One epoch of this rank's shard in batches of `rows_per_rank` string rows, shuffled with `seed`. Ray Train
    splits the dataset into equal shards, so every rank takes the same number of updates (ZeRO's collectives and
    the gradient all-reduce need that)."""
    yield from shard.iter_batches(
        batch_size=rows_per_rank,
        batch_format="numpy",
        local_shuffle_buffer_size=SHUFFLE_ROWS,
        local_shuffle_seed=seed,
    )


def restored_state() -> tuple[dict | None, Any]:
    """(state, checkpoint) of the last checkpoint reported to Ray Train in this run, or (None, None)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / STATE).read_text()), checkpoint


def report_epoch(engine: TrainEngine, rank: int, state: dict, metrics: dict) -> None:
    """Every rank writes its part of the engine checkpoint; Ray Train merges the parts into one checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(Path(tmp) / "engine")
        if rank == 0:
            (Path(tmp) / STATE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

"""The experience stream of the RL stage: one long-lived Ray Data pipeline that carries every step's experience
from the prompts to the learners.

    driver --put--> Feed (queue actor) --read task--> generate --> score --> reference (+ values)
        --> advantages --streaming_split(W)--> learner rank 0..W-1

- The source is a `Feed` actor drained by one streaming read task. The driver puts a step's prompt chunks into
  it when that step may sample: after the previous step's weight sync (sync mode), or up to
  `rollout.max_staleness` steps early (async mode). One Dataset is built per RL stage and runs until `close`,
  so Ray Data's per-execution start-up is paid once.
- A row is one chunk of `rollout.chunk_size` prompts with its step and chunk index; the experience travels in
  the row as one pickled payload (`ExperienceItem`: ragged tensors), so blocks stay one chunk each. Every map
  calls its role's actor (chunk c goes to worker c mod n) and appends the wall-clock interval it spent.
  Chunks pipeline through the stages (chunk c+1 generates while chunk c is scored), and Ray Data's
  backpressure bounds what is in flight. The driver never holds the experience, only the chunk counts.
- Advantages are computed per chunk. Group baselines (GRPO, RLOO) only look inside a prompt's group, so they
  are exact; the whitening of REINFORCE++ and PPO runs over the chunk rather than the whole step.
- Only the map tasks (and the learners) import torch: the Feed actor, the read task and the split coordinator
  load this module and pipeline/types.py, and neither imports it (tests/unit/test_stream_imports.py).
- `streaming_split` hands rows to the ranks greedily by rows received. Every chunk is one row and every rank
  takes exactly chunks/W rows per step (the learners then meet in the gradient all-reduce), so each rank gets
  W-th of this step's chunks and never one of the next step's.
"""

from __future__ import annotations

import pickle
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import AlgoConfig
from pipeline.types import ExperienceItem, PromptBatch

CHUNK_SEED_STRIDE = 1000  # chunk c samples prompt i with seed + c * stride + i


class Feed:
    """The stream's source queue: the driver puts chunks, the read task takes them; None ends the stream."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, items: list[ExperienceItem | None]) -> None:
        for item in items:
            self._queue.put(item)

    def get(self) -> ExperienceItem | None:
        return self._queue.get()


# threaded: the read task blocks in get() while the driver puts
FeedActor = ray.remote(num_cpus=0, max_concurrency=4)(Feed)


class _FeedSource(Datasource):
    """One read task that yields a one-row block per chunk taken from the Feed, until None."""

    def __init__(self, feed):
        self._feed = feed

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        feed = self._feed

        def read() -> Iterator[pa.Table]:
            while (item := ray.get(feed.get.remote())) is not None:
                yield encode([item])

        return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))]


def encode(items: list[ExperienceItem]) -> pa.Table:
    return pa.table(
        {
            "step": pa.array([it.step for it in items], pa.int64()),
            "chunk": pa.array([it.chunk for it in items], pa.int64()),
            "payload": pa.array([pickle.dumps(it) for it in items], pa.binary()),
        }
    )


def decode(block: pa.Table) -> list[ExperienceItem]:
    return [pickle.loads(p) for p in block.column("payload").to_pylist()]


def _stage(block: pa.Table, fn: Callable[[ExperienceItem], None]) -> pa.Table:
    items = decode(block)
    for item in items:
        fn(item)
    return encode(items)


def _timed(item: ExperienceItem, stage: str, fn: Callable[[], Any]) -> Any:
    start = time.time()
    out = fn()
    item.times.append((stage, start, time.time()))
    return out


# The stage functions run as Ray Data tasks; each takes the role's actor handles as fn_kwargs.
def _generate(block: pa.Table, workers: list) -> pa.Table:
    def fn(item: ExperienceItem) -> None:
        worker = workers[item.chunk % len(workers)]
        item.rollouts = _timed(item, "gen", lambda: ray.get(worker.generate.remote(item.prompts)))

    return _stage(block, fn)


def _score(block: pa.Table, workers: list) -> pa.Table:
    def fn(item: ExperienceItem) -> None:
        worker = workers[item.chunk % len(workers)]
        item.scores = _timed(item, "reward", lambda: ray.get(worker.score.remote(item.rollouts)).scores)

    return _stage(block, fn)


def _reference(block: pa.Table, workers: list, critics: list) -> pa.Table:
    def fn(item: ExperienceItem) -> None:
        worker = workers[item.chunk % len(workers)]
        item.ref_logprobs = _timed(item, "ref", lambda: ray.get(worker.logprobs.remote(item.rollouts)))
        if critics:  # every critic rank joins the forward (ZeRO-3 gathers are collective)
            refs = [c.compute_values.remote(item.rollouts) for c in critics]
            item.values = _timed(item, "values", lambda: ray.get(refs)[0])

    return _stage(block, fn)


def _advantages(block: pa.Table, algo: AlgoConfig, gold_reward: str | None) -> pa.Table:
    # here, not at the top: the module's other processes (Feed, read task, split coordinator) stay torch-free
    from pipeline.experience import Chunk, chunk_experience

    def fn(item: ExperienceItem) -> None:
        if item.rollouts is None or item.scores is None or item.ref_logprobs is None:
            raise RuntimeError(f"step {item.step} chunk {item.chunk} reached the advantage stage unscored")
        chunk = Chunk(item.rollouts, item.scores, item.ref_logprobs, item.values)
        item.train, item.metrics = _timed(
            item, "advantage", lambda: chunk_experience(chunk, algo, kl_coef=item.kl_coef, gold_reward=gold_reward)
        )
        item.rollouts = item.scores = item.ref_logprobs = item.values = None  # all in item.train now

    return _stage(block, fn)


class ExperienceStream:
    """The RL stage's Ray Data pipeline; `splits[r]` is learner rank r's DataIterator."""

    def __init__(
        self,
        *,
        rollouts: list,
        rewards: list,
        references: list,
        critics: list,
        algo: AlgoConfig,
        gold_reward: str | None,
        num_splits: int,
    ):
        self.feed = FeedActor.remote()
        context = ray.data.DataContext.get_current()
        saved = context.target_max_block_size, context.execution_options.preserve_order
        # A Dataset seals a copy of the current context when it is made: one-row blocks (a block is emitted as
        # soon as it holds a chunk instead of waiting to fill 128 MiB) and chunks kept in step order.
        context.target_max_block_size, context.execution_options.preserve_order = 1, True
        context.enable_progress_bars = False
        try:
            ds = ray.data.read_datasource(_FeedSource(self.feed), override_num_blocks=1, num_cpus=0)
            stages = [
                (_generate, {"workers": rollouts}),
                (_score, {"workers": rewards}),
                (_reference, {"workers": references, "critics": critics}),
                (_advantages, {"algo": algo, "gold_reward": gold_reward}),
            ]
            # Ray Data fuses the four maps into one task per chunk; this many chunks are in flight at once, enough
            # for every worker to have one while the chunk before it moves on.
            in_flight = ray.data.TaskPoolStrategy(size=len(rollouts) + len(rewards) + len(references) + 1)
            for fn, kwargs in stages:
                ds = ds.map_batches(
                    fn,
                    fn_kwargs=kwargs,
                    batch_size=None,
                    batch_format="pyarrow",
                    num_cpus=0,
                    compute=in_flight,
                    zero_copy_batch=True,
                )
            self.splits = ds.streaming_split(num_splits, equal=False)
        finally:
            context.target_max_block_size, context.execution_options.preserve_order = saved

    def put(
        self, step: int, prompts: list[str], *, samples_per_prompt: int, chunk_size: int, seed: int, kl_coef: float
    ) -> int:
        """Queue one step's prompts as chunks (chunk c samples with seed + 1000 c). -> number of chunks."""
        items = [
            ExperienceItem(
                step=step,
                chunk=c,
                kl_coef=kl_coef,
                prompts=PromptBatch(
                    prompts[start : start + chunk_size], samples_per_prompt, seed=seed + CHUNK_SEED_STRIDE * c
                ),
            )
            for c, start in enumerate(range(0, len(prompts), chunk_size))
        ]
        ray.get(self.feed.put.remote(items))
        return len(items)

    def close(self) -> None:
        """End the stream (its read task returns) and drop the split iterators."""
        ray.get(self.feed.put.remote([None]))
        self.splits = []  # the Feed actor goes with the read task, which holds the last handle

"""Held-out data and the measurements made on it, for every stage that judges a model (sft, reward, dpo, eval) and
for the RL loop's held-out prompts: the one reader of a data file's test split, the unique prompts of its rows,
`remote`, which runs a measurement as a one-CPU Ray task, and `score_pairs`, reward models' scores of labelled
pairs with progress lines, kept in a file that a later measurement of the same models on the same pairs reads back
(eval's calibration reuses the reward stage's held-out scores). `row_check` and `quiet` serve the train-split reader
(`offline.train_dataset`) too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import ray
import torch

from actors.reward import ModelScorer
from pipeline.config import RewardConfig
from pipeline.data import RowCheck, read_dataset
from pipeline.progress import EVERY_S, Ticker
from pipeline.stages.context import StageContext

PAIRS_PER_CALL = 1024  # score_pairs: pairs per call to its scorer actor, the unit its progress lines count
HELDOUT_SCORES = "heldout_scores.pt"  # in the reward stage's dir: its members' scores of the held-out pairs
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def heldout_rows(
    ctx: StageContext,
    kind: str,
    tokenizer_dir: Path,
    *,
    unsplit: Literal["all", "none"],
    limit: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, str]]:
    """The test split's clean rows of `data.<kind>`, in file order; at most `limit` of them.

    A file without a `split` column holds out every row (`unsplit="all"`: a file given to evaluate with, or prompts
    the RL loop both trains and evaluates on) or none (`"none"`: the file is training data, so nothing was held out
    of it). Bad rows follow `data.on_bad_rows`; `log` gets the data notes (skipped and duplicate rows), which the
    train split's reader has usually given already."""
    path = ctx.data_file(kind)
    ds, _ = read_dataset(
        path, row_check(ctx, kind, tokenizer_dir), on_bad_rows=ctx.cfg.data.on_bad_rows, split="test", log=log
    )
    rows = quiet(ds if limit is None else ds.limit(limit)).take_all()  # read to the end: no half-read iteration
    return rows if unsplit == "all" else [r for r in rows if r.get("split") == "test"]


def row_check(ctx: StageContext, kind: str, tokenizer_dir: Path) -> RowCheck:
    data = ctx.cfg.data
    return RowCheck(
        kind,
        tokenizer_dir=tokenizer_dir,
        max_prompt_tokens=data.max_prompt_tokens,
        max_response_tokens=data.max_response_tokens,
    )


def quiet(ds: ray.data.Dataset) -> ray.data.Dataset:
    """No progress bars for this dataset: the stages print their own lines."""
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


def unique(items: list[str]) -> list[str]:
    """`items` without repeats, in first-seen order (a prompt has several demos or pairs)."""
    return list(dict.fromkeys(items))


def remote(fn: Callable, *args, **kwargs):
    """Run `fn` as a one-CPU Ray task and wait for it: measurements that load a model stay off the driver's
    process, and the worker exits after it (`max_calls=1`), so the model and the engines it imported do not stay in
    an idle worker for the rest of the run."""
    return ray.get(ray.remote(num_cpus=1, max_calls=1)(fn).remote(*args, **kwargs))


def score_pairs(
    log: Callable[[str], None],
    what: str,
    model_dirs: Sequence[str],
    reward: RewardConfig,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    reuse: Path | None = None,
    keep: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K reward models' scores of B labelled pairs' chosen and rejected responses, [K, B] each, scored as
    `reward` configures the RL stage's scorer (micro-batches, packing). One one-CPU actor loads the models once and
    takes the pairs `PAIRS_PER_CALL` at a time; `log` gets `what` with the pair count at the start, then pairs done
    / total, rate and ETA every 20 s. The actor ends with the call.

    `keep`: a file to write the scores to, with a digest of what was scored (scores_key). `reuse`: such a file to
    read them from instead when it holds the scores of the same model files (path, size, modification time), scoring
    settings and pairs."""
    key = scores_key(model_dirs, reward, prompts, chosen, rejected) if reuse or keep else ""
    if reuse is not None and (hit := read_scores(reuse, key)) is not None:
        log(f"{what}: {len(prompts)} pairs, {len(model_dirs)} model(s): the scores in {reuse} (same models and pairs)")
        return hit
    scorer = ray.remote(num_cpus=1)(ModelScorer).remote(
        [Path(d) for d in model_dirs],
        reward.micro_batch_size,
        packing=reward.packing,
        max_tokens_per_micro_batch=reward.max_tokens_per_micro_batch,
    )
    log(f"{what}: {len(prompts)} pairs, {len(model_dirs)} model(s)")
    try:
        parts = [(start, min(start + PAIRS_PER_CALL, len(prompts))) for start in range(0, len(prompts), PAIRS_PER_CALL)]
        # one call a part, its chosen then its rejected responses; the actor takes its calls in order
        refs = {scorer.score.remote(prompts[a:b] * 2, chosen[a:b] + rejected[a:b]): (a, b) for a, b in parts}
        ticker, pending, done = Ticker(log, what, len(prompts), "pairs", EVERY_S), list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=EVERY_S)
            done += sum(b - a for a, b in (refs[r] for r in ready))
            ticker.update(done)
        scores = [ray.get(r) for r in refs]  # [K, 2 * part] each: the part's chosen, then its rejected
        halves = [s.chunk(2, dim=1) for s in scores]
        result = torch.cat([c for c, _ in halves], 1), torch.cat([r for _, r in halves], 1)
    finally:
        ray.kill(scorer)
    if keep is not None:
        tmp = keep.with_name(f".{keep.name}.tmp")
        torch.save({"key": key, "chosen": result[0], "rejected": result[1]}, tmp)
        tmp.replace(keep)
    return result


def scores_key(
    model_dirs: Sequence[str], reward: RewardConfig, prompts: list[str], chosen: list[str], rejected: list[str]
) -> str:
    """A digest of what `score_pairs` scores: each model dir's weight files (resolved path, size, modification
    time), the scorer's settings and the pairs' texts in order."""
    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            digest.update(str(part).encode())
            digest.update(b"\0")

    for d in model_dirs:
        files = sorted(f for f in Path(d).resolve().iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
        add("model", len(files), *((f, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    add("scorer", reward.micro_batch_size, reward.packing, reward.max_tokens_per_micro_batch, len(prompts))
    for row in zip(prompts, chosen, rejected, strict=True):
        add(*row)
    return digest.hexdigest()


def read_scores(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (chosen, rejected) scores saved in `path` under `key`; None when there are none or they are of other
    models or pairs."""
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    return (saved["chosen"], saved["rejected"]) if saved.get("key") == key else None

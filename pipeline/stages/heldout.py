"""Held-out data and the measurements made on it, for every stage that judges a model (sft, reward, dpo, eval) and
for the RL loop's held-out prompts: the one reader of a data file's test split, the unique prompts of its rows, and
`remote`, which runs a measurement as a one-CPU Ray task. `row_check` and `quiet` serve the train-split reader
(`offline.train_dataset`) too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import ray

from pipeline.data import RowCheck, read_dataset
from pipeline.stages.context import StageContext


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
    process."""
    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args, **kwargs))

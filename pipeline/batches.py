"""Batch plumbing for the typed batch dataclasses of pipeline/types.py (TrainBatch, Rollouts, the offline
batches): slice, pick, shard, join and move every per-sequence field at once. Torch only, so the driver and the
actors share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

Tensor = torch.Tensor
Batch = TypeVar("Batch", bound=Any)  # a dataclass of per-sequence fields: TrainBatch, or Rollouts for compute_logprobs


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Sequences [start, stop) of a batch dataclass: every tensor and list field is sliced on dim 0."""
    return map_fields(batch, lambda v: v[start:stop])


def take(batch: Batch, index: Tensor) -> Batch:
    """The sequences `index` [b] (long, in that order) of a batch dataclass."""
    picked = index.tolist()
    return map_fields(batch, lambda v: v[index.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in picked])


def map_fields(batch: Batch, fn: Callable[[Any], Any]) -> Batch:
    """Apply fn to every per-sequence field (tensor or list) of a batch dataclass; scalars are kept."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor | list):
            changes[f.name] = fn(value)
    return dataclasses.replace(batch, **changes)


def shard(batch: Batch, world_size: int) -> list[Batch]:
    """Split a batch into `world_size` equal, contiguous shards (one per rank).

    Equal shards keep every rank at the same number of forward/backward passes, which ZeRO-3 needs: its
    parameter all-gathers are collectives."""
    n = len(batch)
    if n % world_size:
        raise ValueError(f"batch of {n} sequences does not split into {world_size} equal learner shards")
    size = n // world_size
    return [rows(batch, r * size, (r + 1) * size) for r in range(world_size)]


def concat_batches(batches: list[Batch]) -> Batch:
    """Join batches of one dataclass along dim 0. 2-D tensors of different widths are padded with zeros (False
    for masks): on the left for `prompt_*` fields, which are left-padded, on the right otherwise. Scalars and
    None fields come from the first batch."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(batches[0]):
        values = [getattr(b, f.name) for b in batches]
        if isinstance(values[0], list):
            changes[f.name] = [x for v in values for x in v]
        elif isinstance(values[0], Tensor):
            width = max(v.shape[1] for v in values) if values[0].dim() == 2 else 0
            left = f.name.startswith("prompt_")
            pad = [
                torch.nn.functional.pad(v, (width - v.shape[1], 0) if left else (0, width - v.shape[1]))
                if v.dim() == 2
                else v
                for v in values
            ]
            changes[f.name] = torch.cat(pad)
    return dataclasses.replace(batches[0], **changes)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return map_fields(batch, lambda v: v.to(device) if isinstance(v, Tensor) else v)


def pad_right(rows: Sequence[Sequence[int | float]], pad: int | float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Ragged rows -> (values [B, T], mask [B, T]) padded on the right; T = longest row (at least 1)."""
    width = max([len(r) for r in rows] + [1])
    values = torch.full((len(rows), width), pad, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=dtype)
        mask[i, : len(r)] = True
    return values, mask


def pad_left(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Ragged token rows -> (ids [B, Tp], mask [B, Tp]) padded on the left, so every prompt ends at column Tp-1."""
    ids, mask = pad_right([r[::-1] for r in rows], pad, torch.long)
    return ids.flip(1), mask.flip(1)

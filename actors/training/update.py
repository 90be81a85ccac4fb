"""The update every learner shares: micro-batch plans, one optimizer update accumulated over micro-batches so that
it equals the single-process full-batch update whatever the micro-batch size, rank count or sequence lengths, the
collectives that keep ranks in step, and the metric averaging over micro-batches and ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from actors.sequences import Layout, lengths_of, micro_batches, split_to
from pipeline.batches import Batch, rows, take
from pipeline.config import LearnerConfig

if TYPE_CHECKING:
    from actors.training.engine import TrainEngine

Tensor = torch.Tensor

# How many "units" each loss aggregation averages over: a micro-batch's loss weighs units_mb / units_step.
AGG_UNITS: dict[str, Callable[[Tensor], Tensor]] = {
    "token-mean": lambda mask: mask.sum(),
    "seq-mean-token-sum": lambda mask: mask.any(dim=-1).sum(),
    "seq-mean-token-mean": lambda mask: mask.any(dim=-1).sum(),
}


def global_sum(x: Tensor, world_size: int) -> Tensor:
    """Sum of a scalar over all ranks (x itself when there is one rank)."""
    if world_size > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def global_max(x: int, world_size: int, device: torch.device) -> int:
    """Largest x over all ranks (x itself when there is one rank): a collective, so every rank must call it."""
    if world_size == 1:
        return x
    t = torch.tensor(float(x), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank when `flag` is true on some rank: one all-reduce, so every rank must call it."""
    return bool(global_sum(torch.tensor(float(flag), device=device), world_size).item() > 0)


INPUTS = ("reward", "logprobs")  # what nonfinite_input names


def nonfinite_input(batch: Batch) -> str | None:
    """`reward` when the advantages or returns (made from the rewards) hold NaN or inf, `logprobs` when another
    float field does; None when all are finite."""
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return "reward" if f.name in ("advantages", "returns") else "logprobs"
    return None


SUMMED = "tokens/"  # metric keys that count work (tokens/real, tokens/computed): ranks' counts add up


def mean_metrics(metrics: list[dict[str, float]], weights: list[float] | None = None) -> dict[str, float]:
    """(Weighted) mean of each key over the dicts; keys ending in `_max` take the max, keys under `tokens/` are
    counts and add up."""
    weights = [1.0] * len(metrics) if weights is None else weights
    total = sum(weights) or 1.0
    out = {}
    for key in metrics[0]:
        if key.endswith("_max"):
            out[key] = max(m[key] for m in metrics)
        elif key.startswith(SUMMED):
            out[key] = sum(m[key] for m in metrics)
        else:
            out[key] = sum(w * m[key] for m, w in zip(metrics, weights, strict=True)) / total
    return out


def micro_batch_plan(
    batch, cfg: LearnerConfig, layout: Layout, world_size: int, device: torch.device, *, sync: bool
) -> list[Tensor]:
    """This rank's micro-batches of `batch` (index tensors): `cfg.micro_batch_size` sequences each, or up to
    `cfg.max_tokens_per_micro_batch` tokens as `layout` computes them. sync (a collective): as many micro-batches
    as the rank with the most, since ranks meet in a collective per micro-batch (accumulate_update, ZeRO-3)."""
    lengths = lengths_of(batch.prompt_mask, batch.response_mask)
    budget = cfg.max_tokens_per_micro_batch
    plan = micro_batches(lengths, rows=cfg.micro_batch_size, max_tokens=budget, tokens=layout.tokens)
    if sync and budget is not None:  # row counts give equal shards the same number already
        plan = split_to(plan, global_max(len(plan), world_size, device), lengths, layout.tokens)
    return plan


def collective_forwards(cfg: LearnerConfig, world_size: int) -> bool:
    """Whether a forward pass is a collective (ZeRO-3 gathers the parameters), so ranks must run as many."""
    return cfg.backend == "deepspeed" and cfg.zero_stage == 3 and world_size > 1


def accumulate_update(
    engine: TrainEngine,
    batch: Batch,
    *,
    micro_batch_size: int | None = None,
    plan: list[Tensor] | None = None,
    agg: str,
    world_size: int,
    loss_fn: Callable[[int, Batch], tuple[Tensor, dict[str, float]]],
) -> dict[str, float]:
    """One optimizer update over `batch`, in micro-batches: the index tensors of `plan` (every rank the same
    number of them), or else consecutive runs of `micro_batch_size` sequences. -> metrics (`grad_norm`
    included), weighted like the loss, so `loss/*` is this rank's whole-batch loss.

    loss_fn(i, micro_batch) returns the micro-batch loss aggregated with `agg`. It is weighted by the
    micro-batch's share of the step's units (tokens or sequences, summed over ranks) times world_size,
    because the engine averages gradients over ranks: the sum is the gradient of the full-batch loss, however
    the sequences are grouped into micro-batches."""
    bad = nonfinite_input(batch)
    flags = global_sum(torch.tensor([float(bad == q) for q in INPUTS], device=engine.device), world_size)
    if flags.sum().item() > 0:  # every rank skips, naming what some rank found
        return {f"bad/{q}": 1.0 for q, f in zip(INPUTS, flags.tolist(), strict=True) if f > 0}
    if plan is None:
        size = micro_batch_size or len(batch)
        micro = [rows(batch, s, s + size) for s in range(0, len(batch), size)]
    else:
        micro = [take(batch, idx) for idx in plan]
    units = [float(AGG_UNITS[agg](mb.response_mask)) for mb in micro]
    total = float(global_sum(torch.tensor(sum(units), dtype=torch.float64, device=engine.device), world_size)) or 1.0
    metrics = []
    for i, mb in enumerate(micro):
        loss, m = loss_fn(i, mb)
        if any_rank(not torch.isfinite(loss).item(), world_size, engine.device):
            engine.discard()
            return {"bad/loss": 1.0}
        engine.backward(loss * (world_size * units[i] / total))
        metrics.append(m)
    out = {**mean_metrics(metrics, units), "grad_norm": engine.step()}
    if not math.isfinite(out["grad_norm"]):
        out["bad/grad"] = 1.0
    return out

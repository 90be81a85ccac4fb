"""One RL step's experience -> learner shards: join the chunks, shape rewards with the KL penalty, compute
advantages for the configured algorithm, and the step's experience metrics.

Runs as a Ray task next to the data (`ray.remote(make_train_batches)`), so the driver never holds a step's
tensors. Pure torch plus pipeline.algo; each algorithm is one small function in ADVANTAGE_FNS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.reward import gold_scores
from pipeline.algo import (
    ADVANTAGES,
    gae,
    masked_kl,
    masked_mean,
    masked_sum,
    masked_whiten,
    reinforce_pp_advantages,
    shaped_token_rewards,
)
from pipeline.batches import pad_left, pad_right, shard
from pipeline.config import AlgoConfig
from pipeline.types import Rollouts, TrainBatch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Chunk:
    """The experience of one micro-batch of prompts, as the workers returned it."""

    rollouts: Rollouts
    scores: Tensor  # [B] the reward being optimized
    ref_logprobs: Tensor  # [B, T]
    values: Tensor | None = None  # [B, T] critic values (ppo)


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Join rollouts of one weight version and group size, re-padding prompts (left) and responses (right).
    Padding takes id 0: every consumer masks padded positions, so their value never matters."""
    pad = 0

    def rows(ids: Tensor, mask: Tensor) -> list[list[int]]:
        return [r[m].tolist() for r, m in zip(ids, mask, strict=True)]

    prompt_ids, prompt_mask = pad_left([r for p in parts for r in rows(p.prompt_ids, p.prompt_mask)], pad)
    response_rows = [r for p in parts for r in rows(p.response_ids, p.response_mask)]
    response_ids, response_mask = pad_right(response_rows, pad, torch.long)
    logprob_rows = [r for p in parts for r in rows(p.rollout_logprobs, p.response_mask)]
    return Rollouts(
        prompts=[x for p in parts for x in p.prompts],
        responses=[x for p in parts for x in p.responses],
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=pad_right(logprob_rows, 0.0, torch.float32)[0],
        finish_reasons=[x for p in parts for x in p.finish_reasons],
        weight_version=min(p.weight_version for p in parts),
        group_size=parts[0].group_size,
    )


def pad_to(x: Tensor, width: int) -> Tensor:
    """Right-pad [B, T] with zeros to [B, width]."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


# Each returns (advantages [B, T], returns [B, T] or None) from the step's KL-shaped signal.
def _group_advantages(name: str) -> Callable:
    def advantages(r: Rollouts, scores, kl, coef, algo, values):
        # Group methods take one number per sequence: the score minus the KL penalty summed over its tokens.
        seq = scores - coef * masked_sum(kl, r.response_mask, dim=-1)
        adv = ADVANTAGES[name](seq, group_size=r.group_size)
        return torch.where(r.response_mask, adv[:, None], 0.0), None

    return advantages


def _reinforce_pp(r: Rollouts, scores, kl, coef, algo, values):
    token_rewards, _ = _shaped(r, scores, kl, coef)
    return reinforce_pp_advantages(token_rewards, r.response_mask, gamma=algo.gamma)


def _ppo(r: Rollouts, scores, kl, coef, algo, values):
    token_rewards, _ = _shaped(r, scores, kl, coef)
    advantages, returns = gae(token_rewards, values, r.response_mask, gamma=algo.gamma, lam=algo.lam)
    return masked_whiten(advantages, r.response_mask), returns


def _shaped(r: Rollouts, scores: Tensor, kl: Tensor, coef: float):
    # kl is already estimated; shaped_token_rewards re-estimates from logprobs, so pass logprobs and 0 ref
    # with kind k1 to reuse the given per-token KL exactly.
    return shaped_token_rewards(scores, kl, torch.zeros_like(kl), r.response_mask, kl_coef=coef, kind="k1")


ADVANTAGE_FNS: dict[str, Callable] = {
    "grpo": _group_advantages("grpo"),
    "rloo": _group_advantages("rloo"),
    "reinforce_pp": _reinforce_pp,
    "ppo": _ppo,
}


def make_train_batches(
    chunks: list[Chunk], algo: AlgoConfig, *, kl_coef: float, world_size: int, gold_reward: str | None = None
) -> tuple[list[TrainBatch], dict[str, float]]:
    """-> (one TrainBatch per learner rank, experience metrics of the step)."""
    r = concat_rollouts([c.rollouts for c in chunks])
    width = r.response_ids.shape[1]
    scores = torch.cat([c.scores for c in chunks]).float()
    ref_logprobs = torch.cat([pad_to(c.ref_logprobs, width) for c in chunks])
    values = None
    if chunks[0].values is not None:  # ppo: every chunk has critic values
        values = torch.cat([pad_to(c.values, width) for c in chunks if c.values is not None])
    mask = r.response_mask
    kl = masked_kl(r.rollout_logprobs, ref_logprobs, mask, kind=algo.kl.estimator)
    in_reward = kl_coef if algo.kl.mode == "reward" else 0.0
    advantages, returns = ADVANTAGE_FNS[algo.name](r, scores, kl, in_reward, algo, values)
    batch = TrainBatch(
        prompt_ids=r.prompt_ids,
        prompt_mask=r.prompt_mask,
        response_ids=r.response_ids,
        response_mask=mask,
        old_logprobs=r.rollout_logprobs,
        advantages=advantages,
        ref_logprobs=ref_logprobs,
        rollout_logprobs=r.rollout_logprobs,
        returns=returns,
        old_values=values,
        kl_coef=kl_coef if algo.kl.mode == "loss" else 0.0,
    )
    metrics = experience_metrics(r, scores, kl, mask)
    if gold_reward is not None:
        gold = torch.tensor(gold_scores(gold_reward, r.prompts, r.responses), dtype=torch.float32)
        metrics.update({"gold_reward/mean": gold.mean().item(), "gold_reward/std": gold.std().item()})
    return shard(batch, world_size), metrics


def chunk_experience(
    chunk: Chunk, algo: AlgoConfig, *, kl_coef: float, gold_reward: str | None = None
) -> tuple[TrainBatch, dict[str, float]]:
    """The experience stream's advantage stage: one chunk -> (its TrainBatch, its experience metrics)."""
    (batch,), metrics = make_train_batches([chunk], algo, kl_coef=kl_coef, world_size=1, gold_reward=gold_reward)
    return batch, metrics


def combine_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Experience metrics of a step from those of its chunks, equal to computing them on the joined batch:
    counts add up, the entropy is weighted by tokens, other means by samples, and each `x/std` is pooled with
    its `x/mean` (the sample std of all the values)."""
    n = [p["samples"] for p in parts]
    total = sum(n)
    out: dict[str, float] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in ("samples", "tokens"):
            out[key] = sum(values)
        elif key == "weight_version":
            out[key] = min(values)
        elif key == "policy/entropy":
            tokens = [p["tokens"] for p in parts]
            out[key] = sum(t * v for t, v in zip(tokens, values, strict=True)) / max(sum(tokens), 1.0)
        elif not key.endswith("/std"):
            out[key] = sum(k * v for k, v in zip(n, values, strict=True)) / total
    for key in parts[0]:
        if key.endswith("/std"):
            means = [p[key.removesuffix("std") + "mean"] for p in parts]
            mean = sum(k * m for k, m in zip(n, means, strict=True)) / total
            squares = sum((k - 1) * s**2 + k * m**2 for k, s, m in zip(n, [p[key] for p in parts], means, strict=True))
            out[key] = ((squares - total * mean**2) / (total - 1)) ** 0.5 if total > 1 else 0.0
    return out


STREAM_STAGES = ("gen", "reward", "ref", "values", "advantage")


def stage_seconds(intervals: list[tuple[str, float, float]], start: float, end: float) -> dict[str, float]:
    """Split the wall time [start, end] that a step waited for its experience among the stream's stages.

    Stages overlap across chunks, so each moment goes to the earliest stage of STREAM_STAGES busy on some chunk
    then (generation first: it bounds the rest); moments when none was busy go to `stream` (queueing, Ray Data).
    -> seconds per stage; they sum to end - start."""
    cuts = sorted({start, end} | {t for _, a, b in intervals for t in (a, b) if start < t < end})
    out = dict.fromkeys(STREAM_STAGES, 0.0) | {"stream": 0.0}
    for a, b in zip(cuts, cuts[1:], strict=False):
        busy = {stage for stage, s, e in intervals if s <= a and e >= b}
        out[next((s for s in STREAM_STAGES if s in busy), "stream")] += b - a
    return out


def experience_metrics(r: Rollouts, scores: Tensor, kl: Tensor, mask: Tensor) -> dict[str, float]:
    lengths = mask.sum(dim=-1).float()
    return {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl/ref": masked_sum(kl, mask, dim=-1).mean().item(),  # per sequence, with algo.kl.estimator
        # Monte-Carlo entropy estimate: mean negative logprob of the sampled tokens.
        "policy/entropy": -masked_mean(r.rollout_logprobs, mask).item(),
        "response/length_mean": lengths.mean().item(),
        "response/clipped_frac": sum(f == "length" for f in r.finish_reasons) / len(r),
        "samples": float(len(r)),
        "tokens": mask.sum().item(),
        "weight_version": float(r.weight_version),
    }

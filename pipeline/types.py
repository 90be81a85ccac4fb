"""The data that crosses actor boundaries: typed dataclasses of CPU tensors, in the one RL vocabulary.

No torch at import (only for type checking): the processes that only route this data (the experience stream's
Feed actor, read task and split coordinator) unpickle these classes and must not pay for torch.

Shape letters: B sequences (B = P * G, the G samples of one prompt consecutive), P prompts, G samples per prompt,
Tp prompt tokens (left-padded), T response tokens (right-padded). Masks are bool tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class PromptBatch:
    """P prompts to sample G responses each from."""

    prompts: list[str]  # [P]
    samples_per_prompt: int  # G
    seed: int | None = None  # sampling seed of this batch: the same seed and weights give the same samples


@dataclass(frozen=True)
class Rollouts:
    """B = P * G sampled sequences, as the rollout engine produced them."""

    prompts: list[str]  # [B] prompt text of each sequence
    responses: list[str]  # [B] decoded response text
    prompt_ids: Tensor  # [B, Tp] int64, left-padded with the pad id
    prompt_mask: Tensor  # [B, Tp] bool
    response_ids: Tensor  # [B, T] int64, right-padded with the pad id
    response_mask: Tensor  # [B, T] bool
    rollout_logprobs: Tensor  # [B, T] float32, logprob of each sampled token under the engine; 0 where masked
    finish_reasons: list[str]  # [B] "stop" (EOS) or "length" (max_new_tokens reached)
    weight_version: int  # version of the policy weights that produced these samples
    group_size: int  # G

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class TrainBatch:
    """One learner's shard of experience for a policy update."""

    prompt_ids: Tensor  # [B, Tp]
    prompt_mask: Tensor  # [B, Tp]
    response_ids: Tensor  # [B, T]
    response_mask: Tensor  # [B, T]
    old_logprobs: Tensor  # [B, T] logprobs of the policy that sampled (learner-recomputed or rollout)
    advantages: Tensor  # [B, T]
    ref_logprobs: Tensor | None = None  # [B, T], when KL is a loss term
    rollout_logprobs: Tensor | None = None  # [B, T], for mismatch metrics and truncated IS weights
    returns: Tensor | None = None  # [B, T], PPO critic targets
    old_values: Tensor | None = None  # [B, T], PPO value clipping
    kl_coef: float | None = None  # this step's KL-loss coefficient (algo.kl.mode=loss); None: the config's

    def __len__(self) -> int:
        return self.response_ids.shape[0]


@dataclass
class ExperienceItem:
    """One chunk of a step on its way through the experience stream (pipeline/stream.py): each stage fills its
    field; the advantage stage folds them into `train` and `metrics`. `times`: (stage, start, end) wall clock."""

    step: int
    chunk: int  # index within the step: rollout/reward/reference worker chunk % n takes it
    kl_coef: float  # the KL coefficient when the step was queued
    prompts: PromptBatch
    rollouts: Rollouts | None = None
    scores: Tensor | None = None  # [B]
    ref_logprobs: Tensor | None = None  # [B, T]
    values: Tensor | None = None  # [B, T] (ppo)
    train: TrainBatch | None = None
    metrics: dict[str, float] | None = None
    times: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class StepShard:
    """What one learner rank took from its split of the experience stream for a step, besides the TrainBatch it
    made of the chunks (`PolicyLearner.take_step`)."""

    step: int
    experience: list[dict[str, float]]  # each chunk's experience metrics (pipeline/experience.py)
    intervals: list[tuple[str, float, float]]  # (stage, start, end) wall clock of the chunks' stream stages
    ready: float  # wall-clock time the last chunk arrived


# --- what the RL loop yields (pipeline.rl.train_iter); pipeline/recorder.py is the one place that records them ---


@dataclass(frozen=True)
class StepRow:
    """The metrics of one finished RL step (`loss/policy`, `reward/mean`, `timing/gen`, ...; no `step` key)."""

    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalRow:
    """A held-out evaluation (`eval/reward`, `eval/prompts`, `eval/gold_reward` when the task has a gold reward)
    with the weights of `step`: before step 1 (step 0), or `final` after the loop's last step."""

    step: int
    metrics: dict[str, float]
    final: bool = False


@dataclass(frozen=True)
class Restart:
    """The loop restarted every role from the checkpoint of `step` (0: none yet): the rows after it come again.
    `count`: the restarts of this loop so far."""

    step: int
    count: int


LoopEvent = StepRow | EvalRow | Restart


@dataclass(frozen=True)
class WeightUpdate:
    """Full or partial policy weights, in HF (checkpoint) names, on CPU."""

    version: int  # version of the learner's policy after the optimizer step that produced these weights
    named_tensors: dict[str, Tensor]  # HF parameter name -> tensor, e.g. "model.layers.0.self_attn.q_proj.weight"
    # LoRA: the adapter's peft config; then named_tensors are the adapter's tensors in peft's saved names, which
    # the engine serves on top of its base weights. None: named_tensors are model weights.
    adapter: dict[str, Any] | None = None

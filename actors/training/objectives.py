"""What the offline stages train on and with: the token batches their rows become (collation: strings -> tensors,
pure and unit-tested) and each stage's objective, its loss on a micro-batch in the forward layout chosen for its
model. The Ray Train loops that run them are in actors/training/offline.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from actors.hf import pad_token_id
from actors.scoring import choose_score_layout, reward_model_inputs, score_lengths
from actors.sequences import choose_layout, lengths_of
from actors.training.engine import TrainEngine
from pipeline.algo import bt_loss, demo_discriminator_loss, dpo_loss, pair_logprobs, sft_loss
from pipeline.batches import pad_left, pad_right
from pipeline.config import DpoConfig

Tensor = torch.Tensor

# A pair loss is a mean over pairs: "seq-mean-token-mean" makes accumulate_update weigh micro-batches by rows.
PAIR_AGG = "seq-mean-token-mean"
# Reward-model losses of (first, second) scores [B] each: Bradley-Terry on (chosen, rejected) preferences, or the
# discriminator on (demonstration, policy sample) pairs of one prompt (equal counts, so its class means are pair means).
PAIR_LOSSES: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]] = {
    "bt": bt_loss,
    "discriminator": demo_discriminator_loss,
}


@dataclass(frozen=True)
class SequenceBatch:
    """B (prompt, response) token sequences in the layout actors.sequences takes."""

    prompt_ids: Tensor  # [B, Tp] int64, left-padded
    prompt_mask: Tensor  # [B, Tp] bool
    response_ids: Tensor  # [B, T] int64, right-padded; each response ends with EOS
    response_mask: Tensor  # [B, T] bool

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def lengths(self) -> Tensor:
        """Real (prompt, response) tokens of each sequence: [B, 2], what the micro-batch plan counts."""
        return lengths_of(self.prompt_mask, self.response_mask)


@dataclass(frozen=True)
class ScoreBatch:
    """2B reward-model inputs in the DESIGN.md convention, pairs interleaved (chosen at 2i, rejected at 2i+1)."""

    input_ids: Tensor  # [2B, L] int64, padded on the tokenizer's side
    attention_mask: Tensor  # [2B, L]

    @property
    def response_mask(self) -> Tensor:
        """accumulate_update counts its units (rows, under PAIR_AGG) through this name."""
        return self.attention_mask.bool()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def lengths(self) -> Tensor:
        """Real tokens of each row: [2B, 1], what the micro-batch plan counts."""
        return score_lengths(self.attention_mask)


@dataclass(frozen=True)
class Objective:
    """A stage's loss on one engine: loss(i, micro_batch) -> (loss, metrics), and `tokens(lengths) -> int`, the
    tokens one forward of its layout (packed or padded, actors.sequences / actors.scoring) computes."""

    loss: Callable[[int, Any], tuple[Tensor, dict[str, float]]]
    tokens: Callable[[Tensor], int]


# ---- collation: strings -> token tensors (pure, unit-tested) ----


def interleave(a: list[str], b: list[str]) -> list[str]:
    """[a0, b0, a1, b1, ...]."""
    return [x for pair in zip(a, b, strict=True) for x in pair]


def sequence_batch(tokenizer, prompts: list[str], responses: list[str]) -> SequenceBatch:
    """Prompts as generation sees them (special tokens added: BOS), responses without special tokens plus EOS, so
    the model learns to stop. Tokenized separately, as a rollout engine produces them."""
    pad = pad_token_id(tokenizer)
    prompt_ids, prompt_mask = pad_left([tokenizer(p).input_ids for p in prompts], pad)
    rows = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in responses]
    response_ids, response_mask = pad_right(rows, pad, torch.long)
    return SequenceBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def pair_sequence_batch(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]) -> SequenceBatch:
    return sequence_batch(tokenizer, interleave(prompts, prompts), interleave(chosen, rejected))


def score_batch(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]) -> ScoreBatch:
    enc = reward_model_inputs(tokenizer, interleave(prompts, prompts), interleave(chosen, rejected))
    return ScoreBatch(enc["input_ids"], enc["attention_mask"])


# ---- the objectives: each stage's loss on a micro-batch, in the forward layout chosen for its model ----


def sft_objective(engine: TrainEngine, packing: bool, *, quiet: bool) -> Objective:
    """Token-mean negative log-likelihood of the responses (agg token-mean)."""
    layout = choose_layout(engine.model, engine.module, engine.device, packing, who="sft", quiet=quiet)

    def loss(i: int, mb: SequenceBatch) -> tuple[Tensor, dict[str, float]]:
        fields = (mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
        return sft_loss(layout.logprobs(engine.model, *fields), mb.response_mask)

    return Objective(loss, layout.tokens)


def score_objective(engine: TrainEngine, packing: bool, pair_loss: str, *, who: str, quiet: bool) -> Objective:
    """PAIR_LOSSES[pair_loss] of the reward model's scores of interleaved pairs (agg PAIR_AGG)."""
    layout = choose_score_layout(engine.model, engine.module, engine.device, packing, who=who, quiet=quiet)
    pair = PAIR_LOSSES[pair_loss]

    def loss(i: int, mb: ScoreBatch) -> tuple[Tensor, dict[str, float]]:
        scores = layout.scores(engine.model, mb.input_ids, mb.attention_mask)
        return pair(scores[0::2], scores[1::2])

    return Objective(loss, layout.tokens)


def dpo_objective(
    engine: TrainEngine, reference: torch.nn.Module, dpo: DpoConfig, packing: bool, *, quiet: bool
) -> Objective:
    """DPO / IPO of interleaved pairs against the frozen `reference` (agg PAIR_AGG); both models take packed
    forwards when they pass the packing check."""
    layout = choose_layout(engine.model, engine.module, engine.device, packing, who="dpo", quiet=quiet)
    ref_device = next(reference.parameters()).device
    ref_layout = choose_layout(reference, reference, ref_device, packing, who="dpo reference", quiet=quiet)

    def loss(i: int, mb: SequenceBatch) -> tuple[Tensor, dict[str, float]]:
        fields = (mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
        with torch.no_grad():
            ref = ref_layout.logprobs(reference, *(f.to(ref_device) for f in fields)).to(engine.device).float()
        policy = layout.logprobs(engine.model, *fields)
        return dpo_loss(
            *pair_logprobs(policy, mb.response_mask, dpo.loss_type),
            *pair_logprobs(ref, mb.response_mask, dpo.loss_type),
            beta=dpo.beta,
            loss_type=dpo.loss_type,
            label_smoothing=dpo.label_smoothing,
        )

    return Objective(loss, layout.tokens)

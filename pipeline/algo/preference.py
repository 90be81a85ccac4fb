"""Direct preference optimization from pairwise preferences, without a separate reward model."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.algo.masking import masked_mean, masked_sum

Tensor = torch.Tensor


def dpo_sigmoid(logits: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO loss per pair (Rafailov et al. 2023, eq. 7) with conservative-DPO label smoothing eps.

    logits: [B] = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected) sequence log-prob ratios.
    loss = -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits): eps is the assumed
    probability that a preference label is flipped (Mitchell 2023, "A note on DPO with noisy preferences").
    """
    agree, flipped = F.logsigmoid(beta * logits), F.logsigmoid(-beta * logits)
    return -(1.0 - label_smoothing) * agree - label_smoothing * flipped


def ipo(logits: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO loss per pair (Azar et al. 2023, "A General Theoretical Paradigm..."): (logits - 1/(2 beta))^2.

    logits: [B] as in `dpo_sigmoid`; beta plays the role of the paper's tau. The paper (and TRL) use
    log-probs averaged over tokens rather than summed; that choice is the caller's. No label smoothing.
    """
    if label_smoothing != 0.0:
        raise ValueError("label_smoothing is only defined for loss_type='sigmoid'")
    return (logits - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[..., Tensor]] = {"sigmoid": dpo_sigmoid, "ipo": ipo}
# Sequence logprob of a response under each loss: summed (DPO), or averaged over tokens (IPO, as in the paper).
SEQUENCE_LOGPROBS: dict[str, Callable[..., Tensor]] = {"sigmoid": masked_sum, "ipo": masked_mean}


def pair_logprobs(logprobs: Tensor, response_mask: Tensor, loss_type: str) -> tuple[Tensor, Tensor]:
    """Sequence logprobs of each pair's chosen and rejected response, as `loss_type` takes them.

    logprobs, response_mask: [2B, T] per-token logprobs of B pairs interleaved (row 2i is pair i's chosen
    response, row 2i+1 its rejected one); loss_type: a key of SEQUENCE_LOGPROBS. -> (chosen [B], rejected [B]).
    """
    seq = SEQUENCE_LOGPROBS[loss_type](logprobs, response_mask, dim=-1)
    return seq[0::2], seq[1::2]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Mean DPO-family loss over B preference pairs, with the implicit-reward metrics.

    All four inputs: [B] sequence log-probs (summed, or averaged for IPO, over response tokens) of the
    chosen/rejected response under the policy (with grad) and the frozen reference.
    loss_type: a key of DPO_LOSSES. Implicit reward of a response: beta * (policy_logps - ref_logps).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(DPO_LOSSES)}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratio - rejected_logratio
    loss = DPO_LOSSES[loss_type](logits, beta=beta, label_smoothing=label_smoothing).mean()
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio
        rejected_reward = beta * rejected_logratio
        metrics = {
            "loss/dpo": loss.item(),
            "dpo/chosen_reward": chosen_reward.mean().item(),
            "dpo/rejected_reward": rejected_reward.mean().item(),
            "dpo/reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
            "dpo/reward_margin": (chosen_reward - rejected_reward).mean().item(),
        }
    return loss, metrics

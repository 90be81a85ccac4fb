"""Policy-gradient losses: PPO clipped surrogate, clipped value loss, entropy, truncated IS weights; and the
supervised fine-tuning loss."""

import torch

from pipeline.algo.logprobs import entropy_from_logits
from pipeline.algo.masking import aggregate_loss, bool_mask, masked_mean

Tensor = torch.Tensor


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with an asymmetric clip range.

    logprobs (with grad), old_logprobs, mask: [B, T]; advantages: [B, T], or [B] for sequence-level
    advantages (broadcast over T); is_weights: optional [B, T] detached per-token weights (e.g.
    `truncated_is_weights`) multiplied into the per-token loss. The ratio is clipped to
    [1 - clip_low, 1 + clip_high] (clip_high > clip_low is DAPO's clip-higher, Yu et al. 2025).
    dual_clip = c > 1 caps the loss of negative-advantage tokens at -c * A (Ye et al. 2020, "Mastering
    Complex Control in MOBA Games").
    agg: see masking.LOSS_AGGREGATIONS. Metrics are token means over valid tokens; "policy/approx_kl"
    is the k3 estimate of KL(pi_old || pi) from tokens sampled by pi_old: ratio - 1 - log ratio.
    """
    m = bool_mask(mask)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = torch.where(m, advantages, 0.0)
    log_ratio = torch.where(m, logprobs, 0.0) - torch.where(m, old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(m)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        cap = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (per_token > cap) & m
        per_token = torch.where(dual_clipped, cap, per_token)
    if is_weights is not None:
        per_token = per_token * torch.where(m, is_weights, 0.0)
    loss = aggregate_loss(per_token, m, agg=agg)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss.item(),
            "policy/clip_frac": masked_mean((clipped > unclipped).float(), m).item(),
            "policy/dual_clip_frac": masked_mean(dual_clipped.float(), m).item(),
            "policy/approx_kl": masked_mean(ratio - 1.0 - log_ratio, m).item(),
            "policy/ratio_mean": masked_mean(ratio, m).item(),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss, PPO2 style: 0.5 * max((V - R)^2, (V_clip - R)^2).

    values (with grad), old_values (rollout-time critic), returns, mask: [B, T].
    V_clip = old_values + clamp(values - old_values, -clip, clip); clip=None disables clipping.
    """
    m = bool_mask(mask)
    values = torch.where(m, values, 0.0)
    old_values = torch.where(m, old_values, 0.0)
    returns = torch.where(m, returns, 0.0)
    unclipped = (values - returns) ** 2
    if clip is None:
        clipped = unclipped
    else:
        clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    loss = aggregate_loss(0.5 * torch.maximum(unclipped, clipped), m, agg=agg)
    with torch.no_grad():
        metrics = {
            "loss/value": loss.item(),
            "value/clip_frac": masked_mean((clipped > unclipped).float(), m).item(),
            "value/mean": masked_mean(values, m).item(),
        }
    return loss, metrics


def entropy_bonus(logits: Tensor, mask: Tensor, *, agg: str = "token-mean") -> Tensor:
    """Mean policy entropy over valid tokens, with grad; subtract `coef * entropy_bonus(...)` from the loss.

    logits: [B, T, V]; mask: [B, T]. Logits at masked positions must be finite (they are computed, then
    discarded).
    """
    return aggregate_loss(torch.where(bool_mask(mask), entropy_from_logits(logits), 0.0), mask, agg=agg)


def truncated_is_weights(logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Truncated importance-sampling weights min(pi / pi_rollout, cap) for off-policy rollouts (TIS).

    logprobs: [B, T] trainer-side log-probs of the sampled tokens (the policy being corrected toward);
    rollout_logprobs: [B, T] from the inference engine that sampled them; mask: [B, T]. Returns detached
    [B, T] weights, 0 where masked (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"): corrects the engine/trainer mismatch and async staleness, truncated at cap.
    """
    m = bool_mask(mask)
    log_ratio = torch.where(m, logprobs.detach(), 0.0) - torch.where(m, rollout_logprobs, 0.0)
    return torch.where(m, torch.exp(log_ratio).clamp(max=cap), 0.0)


def sft_loss(logprobs: Tensor, response_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Supervised fine-tuning loss: mean negative log-likelihood per response token (prompt tokens and padding
    count for nothing).

    logprobs: [B, T] log pi(y_t | x, y_<t) of the response tokens (with grad); response_mask: [B, T].
    """
    loss = aggregate_loss(-logprobs, response_mask, agg="token-mean")
    return loss, {"loss/sft": loss.item(), "sft/tokens": float(response_mask.sum())}

"""Advantage estimators.

Token-level: `gae` (needs a critic) and `reinforce_pp_advantages` (no critic). Group-level, from one
scalar score per sample with G samples per prompt laid out as consecutive groups: `grpo_advantages`,
`dr_grpo_advantages`, `rloo_advantages`, collected in ADVANTAGES under one signature
fn(scores [B], *, group_size) -> [B]; broadcast the result over the response tokens.

Masks may contain holes (e.g. tool output inside a response): the backward recursions skip masked
positions entirely, so the next *valid* token is the successor of a valid token.
"""

from collections.abc import Callable

import torch

from pipeline.algo.masking import bool_mask, masked_whiten

Tensor = torch.Tensor


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) over the valid tokens of each row.

    token_rewards, values, mask: [B, T]. Returns (advantages [B, T], returns [B, T]), 0 where masked;
    returns = advantages + values. The value after the last valid token is taken as 0 (episode ends).
    """
    m = bool_mask(mask)
    rewards = torch.where(m, token_rewards, 0.0)
    values = torch.where(m, values, 0.0)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        # delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1}
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * running
        next_value = torch.where(m[:, t], values[:, t], next_value)
        running = torch.where(m[:, t], adv_t, running)
        advantages.append(torch.where(m[:, t], adv_t, 0.0))
    adv = torch.stack(advantages[::-1], dim=1)
    return adv, torch.where(m, adv + values, 0.0)


def discounted_returns(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go G_t = r_t + gamma G_{t+1} over the valid tokens of each row.

    token_rewards, mask: [B, T] -> [B, T], 0 where masked.
    """
    m = bool_mask(mask)
    rewards = torch.where(m, token_rewards, 0.0)
    running = torch.zeros_like(rewards[:, 0])
    returns = []
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(m[:, t], rewards[:, t] + gamma * running, running)
        returns.append(torch.where(m[:, t], running, 0.0))
    return torch.stack(returns[::-1], dim=1)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): returns-to-go of the KL-shaped rewards, whitened globally.

    token_rewards, mask: [B, T] (e.g. from `shaped_token_rewards`). Returns (advantages [B, T],
    returns [B, T]), 0 where masked. Whitening uses the mean and std over all valid tokens of the batch,
    not per prompt, which is what distinguishes it from GRPO.
    """
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    return masked_whiten(returns, mask), returns


def _groups(scores: Tensor, group_size: int, min_size: int) -> Tensor:
    """scores [B] with B = P * G -> [P, G], after checking the layout."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size}, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"batch size {scores.shape[0]} is not divisible by group_size {group_size}")
    return scores.view(-1, group_size)


def grpo_advantages(scores: Tensor, *, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): (score - group mean) / (group std + eps).

    scores: [B], B = P * G as P consecutive groups of G = group_size samples. Returns [B].
    The std uses Bessel's correction (divide by G - 1), as TRL and veRL do, so G >= 2 is required.
    scale_by_std=False is Dr. GRPO (Liu et al. 2025), which drops the std division.
    """
    groups = _groups(scores, group_size, min_size=2 if scale_by_std else 1)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(dim=1, keepdim=True, correction=1) + eps)
    return centered.reshape(-1)


def dr_grpo_advantages(scores: Tensor, *, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): score minus group mean.

    scores: [B], B = P * G as consecutive groups. Returns [B].
    """
    return grpo_advantages(scores, group_size=group_size, scale_by_std=False)


def rloo_advantages(scores: Tensor, *, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): score minus the mean score of the other G - 1 samples.

    scores: [B], B = P * G as consecutive groups of G >= 2. Returns [B].
    """
    groups = _groups(scores, group_size, min_size=2)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}

"""KL divergence to the reference policy: per-token estimators, KL-shaped rewards, and a KL loss term.

The estimators follow Schulman, "Approximating KL Divergence" (2020), for KL(pi || pi_ref) with tokens
sampled from pi. Let log r = logprobs - ref_logprobs (the log of pi / pi_ref at the sampled token):
  k1 = log r                       unbiased, high variance, can be negative per token
  k2 = (log r)^2 / 2               biased, low variance, >= 0
  k3 = exp(-log r) - 1 + log r     unbiased, low variance, >= 0
"""

from collections.abc import Callable

import torch

from pipeline.algo.masking import aggregate_loss, bool_mask, last_valid_index

Tensor = torch.Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log(pi / pi_ref) at the sampled token. logprobs, ref_logprobs: [B, T] -> [B, T]."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log(pi / pi_ref))^2 / 2. logprobs, ref_logprobs: [B, T] -> [B, T]."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (pi_ref / pi) - 1 - log(pi_ref / pi) (Schulman 2020). logprobs, ref_logprobs: [B, T] -> [B, T]."""
    log_ratio = logprobs - ref_logprobs
    # x - 1 - log x >= 0 for x = pi_ref / pi, and its mean under pi is KL(pi || pi_ref).
    return torch.exp(-log_ratio) - 1.0 + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, *, kind: str) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate of the named kind ("k1", "k2", "k3").

    logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under the policy and the reference.
    Returns [B, T], unmasked: use `masked_*` or the functions below to reduce it.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


def masked_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, kind: str) -> Tensor:
    """kl_estimate on valid tokens, 0 elsewhere; padding never reaches exp().

    logprobs, ref_logprobs, mask: [B, T] -> [B, T].
    """
    m = bool_mask(mask)
    kl = kl_estimate(torch.where(m, logprobs, 0.0), torch.where(m, ref_logprobs, 0.0), kind=kind)
    return torch.where(m, kl, 0.0)


def shaped_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float | Tensor,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards for PPO-style RLHF: a KL penalty on every token plus the score on the last one.

    scores: [B] sequence rewards; logprobs, ref_logprobs: [B, T]; mask: [B, T] response mask (may have
    leading, trailing or interior zeros). Returns (token_rewards [B, T], kl [B, T]), both 0 where masked.
    r_t = -kl_coef * KL_t + [t == last valid token] * score (Ziegler et al. 2019, sec. 2; Ouyang et al.
    2022, eq. 2). A row with no valid token gets no reward at all: its score is dropped.
    """
    m = bool_mask(mask)
    kl = masked_kl(logprobs, ref_logprobs, m, kind=kind)
    last, has_any = last_valid_index(m)
    positions = torch.arange(m.shape[-1], device=m.device)
    is_last = (positions == last.unsqueeze(-1)) & has_any.unsqueeze(-1)
    score_at_last = torch.where(is_last, scores.unsqueeze(-1).to(kl.dtype), 0.0)
    return torch.where(m, -kl_coef * kl, 0.0) + score_at_last, kl


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: str = "k3",
    agg: str = "token-mean",
) -> Tensor:
    """KL(pi || pi_ref) as a differentiable loss term, the alternative to shaping the reward.

    logprobs (with grad), ref_logprobs, mask: [B, T]. Returns a scalar aggregated with `agg`
    (see masking.LOSS_AGGREGATIONS). The k3 default follows GRPO (Shao et al. 2024, eq. 4).
    """
    return aggregate_loss(masked_kl(logprobs, ref_logprobs, mask, kind=kind), mask, agg=agg)


class FixedKLController:
    """Constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, coef: float):
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL toward `target` (Ziegler et al. 2019, sec. 2).

    Only `coef` is state; `target` and `horizon` are configuration and are not saved in state_dict.
    """

    def __init__(self, init_coef: float, *, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: measured KL per sequence (float or 0-d tensor); n_steps: samples since last update."""
        # e_t = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + K_beta e_t), K_beta = n_steps / horizon.
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])

"""Pure RL / reward-learning math: tensors in, tensors out. Imports torch and the standard library only.

Shape letters: B sequences, P prompts, G samples per prompt, T response tokens, V vocab, K ensemble members.
"""

from pipeline.algo.advantages import (
    ADVANTAGES,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from pipeline.algo.evaluation import (
    Calibration,
    best_of_n,
    best_of_n_kl,
    bootstrap_ci,
    calibration_bins,
    preference_probabilities,
    quantile_bins,
    win_outcomes,
)
from pipeline.algo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    masked_kl,
    shaped_token_rewards,
)
from pipeline.algo.logprobs import entropy_from_logits, token_logprobs
from pipeline.algo.losses import entropy_bonus, ppo_policy_loss, truncated_is_weights, value_loss
from pipeline.algo.masking import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from pipeline.algo.preference import DPO_LOSSES, dpo_loss, dpo_sigmoid, ipo
from pipeline.algo.reward import bt_loss, demo_discriminator_loss, ensemble_mean_std, uncertainty_penalized

__all__ = [
    "ADVANTAGES",
    "DPO_LOSSES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "Calibration",
    "FixedKLController",
    "aggregate_loss",
    "best_of_n",
    "best_of_n_kl",
    "bootstrap_ci",
    "bt_loss",
    "calibration_bins",
    "demo_discriminator_loss",
    "discounted_returns",
    "dpo_loss",
    "dpo_sigmoid",
    "dr_grpo_advantages",
    "ensemble_mean_std",
    "entropy_bonus",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "ipo",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "last_valid_index",
    "masked_kl",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "preference_probabilities",
    "quantile_bins",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "shaped_token_rewards",
    "token_logprobs",
    "truncated_is_weights",
    "uncertainty_penalized",
    "value_loss",
    "win_outcomes",
]

"""Reward learning: from preferences (Bradley-Terry), from demonstrations (a discriminator), ensembles."""

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def bt_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, *, margin: Tensor | float | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(s_chosen - s_rejected - margin).

    chosen_scores, rejected_scores: [B] scalar rewards of each pair's two responses; margin: optional
    [B] (or scalar) required gap, as in Llama 2 (Touvron et al. 2023, eq. 2). Ouyang et al. 2022, eq. 1.
    """
    diff = chosen_scores - rejected_scores
    target = diff if margin is None else diff - margin
    # logsigmoid instead of log(sigmoid(x)): no -inf for very negative x.
    loss = -F.logsigmoid(target).mean()
    with torch.no_grad():
        metrics = {
            "loss/rm": loss.item(),
            "rm/accuracy": (diff > 0).float().mean().item(),
            "rm/margin": diff.mean().item(),
            "rm/chosen_score": chosen_scores.mean().item(),
            "rm/rejected_score": rejected_scores.mean().item(),
        }
    return loss, metrics


def ensemble_mean_std(member_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std (divide by K, no Bessel correction) across ensemble members.

    member_scores: [K, B], K reward models scoring B samples. Returns (mean [B], std [B]); K = 1 gives
    std 0 rather than NaN, which is why the population std is used.
    """
    return member_scores.mean(dim=0), member_scores.std(dim=0, correction=0)


def uncertainty_penalized(mean: Tensor, std: Tensor, penalty: float) -> Tensor:
    """Lower-confidence-bound reward mean - penalty * std, against reward over-optimization.

    mean, std: [B] from `ensemble_mean_std`. Coste et al. 2023 (UWO) penalize the variance; the std
    keeps the penalty in reward units, so `penalty` does not depend on the reward scale.
    """
    return mean - penalty * std


def demo_discriminator_loss(demo_scores: Tensor, policy_scores: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Logistic loss of a reward used as discriminator logit: demonstrations are 1, policy samples 0.

    demo_scores: [N] rewards of expert demonstrations; policy_scores: [M] rewards of policy samples
    (N and M may differ). loss = 0.5 * mean_N(-log sigmoid(s_demo)) + 0.5 * mean_M(-log sigmoid(-s_pol)):
    the average of the two per-class means, so unequal counts do not bias the discriminator toward the
    larger class (the GAIL discriminator, Ho & Ermon 2016, with D = sigmoid(reward) and demonstrations as
    the positive class; reward as logit as in AIRL, Fu et al. 2018).
    "disc/accuracy" is the balanced accuracy (mean of the two per-class accuracies, threshold 0).
    """
    if demo_scores.numel() == 0 or policy_scores.numel() == 0:
        raise ValueError("demo_scores and policy_scores must both be non-empty")
    demo_loss = -F.logsigmoid(demo_scores).mean()
    policy_loss = -F.logsigmoid(-policy_scores).mean()
    loss = 0.5 * (demo_loss + policy_loss)
    with torch.no_grad():
        demo_acc = (demo_scores > 0).float().mean()
        policy_acc = (policy_scores < 0).float().mean()
        metrics = {
            "loss/disc": loss.item(),
            "disc/accuracy": (0.5 * (demo_acc + policy_acc)).item(),
            "disc/demo_accuracy": demo_acc.item(),
            "disc/policy_accuracy": policy_acc.item(),
            "disc/demo_score": demo_scores.mean().item(),
            "disc/policy_score": policy_scores.mean().item(),
        }
    return loss, metrics

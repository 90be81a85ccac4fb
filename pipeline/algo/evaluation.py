"""Statistics of an evaluation: win rates with ties, bootstrap intervals, best-of-N, reward-model calibration.

Shape letters: P prompts, G samples per prompt, M samples per prompt drawn for best-of-N (N <= M), B pairs.
"""

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def win_outcomes(a: Tensor, b: Tensor) -> Tensor:
    """Outcome of each comparison a vs b: 1 where a > b, 0.5 on a tie, 0 where a < b.

    a, b: the same shape, e.g. [P, G] rewards of G policy and G reference samples per prompt. Their mean is the
    win rate of a against b, ties counted half.
    """
    return (a > b).float() + 0.5 * (a == b).float()


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Share of pairs whose chosen response scores higher, ties counted half: the mean of `win_outcomes`.

    chosen, rejected: [B] scores of each pair's two responses (a margin against zeros gives the share of positive
    margins). -> [] float32, or float64 for float64 scores (then the fraction is exact).
    """
    return win_outcomes(chosen, rejected).to(torch.promote_types(chosen.dtype, torch.float32)).mean()


def bootstrap_ci(values: Tensor, *, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `values` and a percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) at `level`.

    values: [P] or [P, G], row p holding the G values of prompt p. Whole rows are resampled with replacement (a
    cluster bootstrap): the samples of one prompt are correlated, so resampling them one by one would give an
    interval that is too narrow. -> (mean, low, high).
    """
    if values.ndim not in (1, 2) or values.shape[0] == 0:
        raise ValueError(f"bootstrap_ci needs values of shape [P] or [P, G] with P >= 1, got {tuple(values.shape)}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bootstrap_ci needs 0 < level < 1 and resamples >= 1 (got {level}, {resamples})")
    rows = values.double().reshape(values.shape[0], -1).mean(dim=1)  # [P]; equal G per row: mean of means = mean
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(rows), (resamples, len(rows)), generator=generator)
    stats = rows[picks].mean(dim=1)  # [resamples]
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=stats.dtype)).tolist()
    return rows.mean().item(), low, high


def best_of_n(proxy: Tensor, gold: Tensor, n: int) -> Tensor:
    """Expected gold reward of best-of-n sampling under `proxy`, per prompt, from M >= n samples per prompt.

    proxy, gold: [P, M] rewards of the same M samples; -> [P]. The exact mean over all C(M, n) subsets of the M
    samples (the unbiased best-of-n estimator of Nakano et al. 2021, as used by Gao et al. 2022): with the
    samples sorted by proxy, the one of ascending rank i (1-based) is the best of a random n-subset with
    probability C(i - 1, n - 1) / C(M, n). Proxy ties go to the later sample (a stable sort).
    """
    m = proxy.shape[-1]
    if proxy.shape != gold.shape or not 1 <= n <= m:
        raise ValueError(
            f"best_of_n needs proxy and gold of one shape [P, M] and 1 <= n <= M; got "
            f"{tuple(proxy.shape)}, {tuple(gold.shape)}, n={n}"
        )
    order = torch.sort(proxy, dim=-1, stable=True).indices
    ranked_gold = torch.gather(gold.double(), -1, order)
    total = math.comb(m, n)
    weights = torch.tensor([math.comb(i, n - 1) / total for i in range(m)], dtype=torch.float64)  # i = rank - 1
    return ranked_gold @ weights


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base policy) = log n - (n - 1) / n, in nats (Stiennon et al. 2020, app. G.3).

    The formula Gao et al. 2022 plot best-of-n against; Beirami et al. 2024 show it is an upper bound, reached
    when the n samples are distinct.
    """
    if n < 1:
        raise ValueError(f"best_of_n_kl needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def preference_probabilities(margins: Tensor) -> tuple[Tensor, Tensor]:
    """Both orientations of each labelled pair, for a reliability diagram of a Bradley-Terry reward model.

    margins: [B] reward(chosen) - reward(rejected). -> (probs [2B], outcomes [2B]): sigmoid(margin), the
    predicted probability that the chosen response is preferred, with outcome 1; and 1 - that, the prediction
    for the rejected one, with outcome 0. With one orientation only every outcome would be 1.
    """
    p = torch.sigmoid(margins.double())
    return torch.cat([p, 1.0 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)])


@dataclass(frozen=True)
class Calibration:
    """A reliability diagram: per bin of predicted probability, its mean prediction and observed frequency."""

    edges: Tensor  # [num_bins + 1] bin edges on [0, 1]
    confidence: Tensor  # [num_bins] mean predicted probability in the bin; NaN where the bin is empty
    frequency: Tensor  # [num_bins] share of outcomes that are 1; NaN where the bin is empty
    count: Tensor  # [num_bins] predictions in the bin
    ece: float  # expected calibration error: sum_b (count_b / N) |frequency_b - confidence_b|


def calibration_bins(probs: Tensor, outcomes: Tensor, num_bins: int) -> Calibration:
    """Reliability diagram with equal-width bins on [0, 1] (bin b holds b / num_bins <= p < (b + 1) / num_bins,
    p = 1 in the last), and the expected calibration error (Guo et al. 2017, eq. 3).

    probs: [N] predicted probabilities; outcomes: [N] 0/1 observed outcomes.
    """
    if probs.shape != outcomes.shape or probs.ndim != 1 or len(probs) == 0 or num_bins < 1:
        raise ValueError(
            f"calibration_bins needs probs and outcomes of one shape [N], N >= 1, num_bins >= 1; got "
            f"{tuple(probs.shape)}, {tuple(outcomes.shape)}, {num_bins}"
        )
    probs, outcomes = probs.double(), outcomes.double()
    index = (probs * num_bins).long().clamp(0, num_bins - 1)
    count = torch.bincount(index, minlength=num_bins).double()
    confidence = torch.bincount(index, weights=probs, minlength=num_bins) / count
    frequency = torch.bincount(index, weights=outcomes, minlength=num_bins) / count
    gaps = torch.where(count > 0, count * (frequency - confidence).abs(), 0.0)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    return Calibration(edges, confidence, frequency, count.long(), (gaps.sum() / len(probs)).item())


def quantile_bins(x: Tensor, y: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of y against mean of x over equal-count bins of x, e.g. error rate against ensemble disagreement.

    x, y: [N]. Sorted by x (stable) and cut into min(num_bins, N) contiguous bins whose sizes differ by at most
    one. -> (mean x [bins], mean y [bins], count [bins]).
    """
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0 or num_bins < 1:
        raise ValueError(
            f"quantile_bins needs x and y of one shape [N], N >= 1, num_bins >= 1; got "
            f"{tuple(x.shape)}, {tuple(y.shape)}, {num_bins}"
        )
    order = torch.sort(x, stable=True).indices
    parts = torch.tensor_split(order, min(num_bins, len(x)))
    xs = torch.stack([x.double()[p].mean() for p in parts])
    ys = torch.stack([y.double()[p].mean() for p in parts])
    return xs, ys, torch.tensor([len(p) for p in parts])


@dataclass(frozen=True)
class GaoFit:
    """R(d) = d (alpha - beta f(d)) fitted to gold-reward gains, with its coefficient of determination."""

    form: str
    alpha: float
    beta: float
    r2: float


def _bon_shape(d: Tensor) -> Tensor:
    return d


def _rl_shape(d: Tensor) -> Tensor:
    # log d diverges at 0, d log d does not: the product, not the factor, is used below
    return torch.where(d > 0, torch.log(torch.where(d > 0, d, 1.0)), 0.0)


# Gao, Schulman & Hilton 2022 (arXiv 2210.10760), eq. 1-2: gold reward gain against d = sqrt(KL) from the initial
# policy is d (alpha - beta d) for best-of-N and d (alpha - beta log d) for RL.
GAO_FORMS = {"best_of_n": _bon_shape, "rl": _rl_shape}


def gao_fit(d: Tensor, gain: Tensor, form: str) -> GaoFit:
    """Least-squares alpha, beta of `gain ~ d (alpha - beta f(d))`, with no intercept (R(0) = 0).

    d: [N] sqrt(KL) of each point (best-of-N: per N; RL: per step); gain: [N] gold reward minus the initial
    policy's. Linear in (alpha, beta): columns [d, -d f(d)]. r2 = 1 - SS_res / SS_tot around the mean gain."""
    if form not in GAO_FORMS:
        raise ValueError(f"gao_fit form {form!r}: expected one of {sorted(GAO_FORMS)}")
    d, gain = d.double().flatten(), gain.double().flatten()
    if d.shape != gain.shape or len(d) < 2:
        raise ValueError(
            f"gao_fit needs two or more (d, gain) points of one shape, got {tuple(d.shape)}, {tuple(gain.shape)}"
        )
    x = torch.stack([d, -d * GAO_FORMS[form](d)], dim=1)  # [N, 2]
    coef = torch.linalg.lstsq(x, gain[:, None]).solution[:, 0]
    residual = gain - x @ coef
    total = ((gain - gain.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum().item() / total.item() if total > 0 else float("nan")
    return GaoFit(form, coef[0].item(), coef[1].item(), r2)


def gao_curve(fit: GaoFit, d: Tensor) -> Tensor:
    """The fitted gain at each d: [N]."""
    d = d.double()
    return d * (fit.alpha - fit.beta * GAO_FORMS[fit.form](d))

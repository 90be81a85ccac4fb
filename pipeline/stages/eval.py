"""The `eval` stage: did the run help, and can its reward be trusted?

1. sample G responses per held-out prompt from the policy and M = max(G, eval.best_of_n) from the reference, with
   rollout workers (vLLM or HF generate) at temperature 1; score them with the run's reward (RewardWorker) and the
   gold reward when there is one; the reference's logprobs of the policy's samples (ReferenceWorker) give the KL;
2. the policy against the reference (pairing sample i of a prompt with sample i): win rates under the reward and
   the gold reward, means of reward, gold reward, KL and length, each with a bootstrap interval over prompts;
3. best-of-N from the reference under the reward for N = 1, 2, 4, ..., eval.best_of_n: gold (and reward) against
   the analytic KL log N - (N - 1) / N, beside the policy's own point (Gao et al. 2022);
4. reward-model calibration on the held-out preference pairs: accuracy, a reliability diagram of the
   Bradley-Terry probability, and, for an ensemble, error rate against member disagreement.

Writes eval.json and plots/eval_*.png into the run dir and returns the headline numbers for summary.json. The
reference is `reference.model`, else the policy before the last training stage, else the policy itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from actors.reward import import_reward_function
from pipeline.algo import (
    best_of_n,
    best_of_n_kl,
    bootstrap_ci,
    calibration_bins,
    ensemble_mean_std,
    gao_fit,
    preference_probabilities,
    quantile_bins,
    win_outcomes,
)
from pipeline.config import Config
from pipeline.errors import ConfigError, DataError
from pipeline.metrics import plot_best_of_n, plot_calibration, plot_gao
from pipeline.stages.context import StageContext
from pipeline.stages.eval_workers import EvalWorkers, Samples
from pipeline.stages.heldout import HELDOUT_SCORES, heldout_rows, score_pairs, unique

Tensor = torch.Tensor
EVAL_JSON = "eval.json"


def run(ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, ev = ctx.cfg, ctx.cfg.eval
    policy, reference = model_dir("model.policy", ctx.policy_dir()), reference_dir(ctx)
    for d in ctx.reward_dirs():
        model_dir("model.reward", d)
    gold = gold_reward_spec(ctx)
    prompts = unique([r["prompt"] for r in eval_rows(ctx, "prompts", ctx.tokenizer_dir())])[: ev.num_prompts]
    ctx.log(f"eval: {policy} against {reference} on {len(prompts)} held-out prompts")
    timing = {}
    with EvalWorkers(cfg, ctx, policy, reference) as workers:
        timing["setup"] = time.perf_counter() - start
        ctx.log(
            f"eval: engines ready ({timing['setup']:.0f} s); {ev.samples_per_prompt} samples per prompt from the "
            f"policy, {max(ev.samples_per_prompt, ev.best_of_n)} from the reference"
        )
        policy_samples, reference_samples = workers.sample(prompts, gold)
        timing["sample"] = time.perf_counter() - start - timing["setup"]
    report: dict[str, Any] = {
        "policy": str(policy),
        "reference": str(reference),
        "prompts": len(prompts),
        "samples_per_prompt": ev.samples_per_prompt,
        "confidence": ev.confidence,
        "bootstrap_resamples": ev.bootstrap_resamples,
    }
    report.update(compare(policy_samples, reference_samples, cfg))
    report["best_of_n"] = best_of_n_curve(reference_samples, cfg)
    report["gao"] = gao_fits(report["best_of_n"], rl_gold_points(ctx))
    mark = time.perf_counter()
    if ctx.reward_dirs():
        ctx.log("eval: the reward model's accuracy and calibration on the held-out pairs")
    report["calibration"] = calibration(ctx)
    timing["calibration"] = time.perf_counter() - mark
    report["timing_s"] = {**timing, "total": time.perf_counter() - start}
    (ctx.run_dir / EVAL_JSON).write_text(json.dumps(report, indent=1) + "\n")
    plots = ctx.run_dir / "plots"
    written = plot_best_of_n(report, plots / "eval_best_of_n.png")
    written += plot_calibration(report["calibration"], plots / "eval_calibration.png")
    written += plot_gao(report["gao"], plots / "eval_gao.png")
    summary = headline(report)
    for line in describe(summary):
        ctx.log(line)
    for form, fit in report["gao"].items():
        ctx.log(
            f"eval: Gao fit ({form}): gold gain = d (alpha - beta f(d)), alpha {fit['alpha']:.4f} "
            f"beta {fit['beta']:.4f} R^2 {fit['r2']:.3f} over {len(fit['d'])} points"
        )
    ctx.log(
        f"eval: wrote {ctx.run_dir / EVAL_JSON} and {', '.join(p.name for p in written) or 'no plots'} "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in timing.items())})"
    )
    summary["timing/eval"] = time.perf_counter() - start
    return summary


def model_dir(key: str, path: Path) -> Path:
    """`path` if it holds an HF model (config.json), else a ConfigError naming `key`."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key} = {path}: not a model dir (no config.json)")
    return Path(path)


def reference_dir(ctx: StageContext) -> Path:
    if ctx.cfg.reference.model is not None:
        return model_dir("reference.model", ctx.cfg.reference.model)
    if ctx.artifacts.initial_policy is not None:
        return Path(ctx.artifacts.initial_policy)
    ctx.log("eval: no reference.model and no training stage before: the policy is its own reference")
    return ctx.policy_dir()


def gold_reward_spec(ctx: StageContext) -> str | None:
    spec = ctx.cfg.eval.gold_reward or ctx.gold_reward()
    if spec is not None:
        try:
            import_reward_function(spec)
        except ConfigError as e:  # it names reward.function; here the key is eval.gold_reward
            raise ConfigError(str(e).replace("reward.function", "eval.gold_reward", 1)) from None
    return spec


def eval_rows(ctx: StageContext, kind: str, tokenizer_dir: Path) -> list[dict[str, str]]:
    """The test split of `data.<kind>`, or every row when the file has no `split` column (a file given to evaluate
    with is held out as a whole); having no such rows is an error."""
    rows = heldout_rows(ctx, kind, tokenizer_dir, unsplit="all", log=ctx.log)
    if not rows:
        raise DataError(f"{ctx.data_file(kind)}: no rows in the test split; the eval stage needs held-out {kind}")
    return rows


def interval(values: Tensor, cfg: Config) -> dict[str, float]:
    ev = cfg.eval
    mean, low, high = bootstrap_ci(values, resamples=ev.bootstrap_resamples, seed=cfg.run.seed, level=ev.confidence)
    return {"mean": mean, "low": low, "high": high}


def compare(policy: Samples, reference: Samples, cfg: Config) -> dict[str, Any]:
    """Win rates of the policy's samples against the reference's (sample i against sample i of each prompt) and
    the means of each, with intervals."""
    g = policy.length.shape[1]
    out: dict[str, Any] = {"win_rate": {}, "policy_means": {}, "reference_means": {}}
    for name in ("reward", "gold"):
        mine, theirs = getattr(policy, name), getattr(reference, name)
        if mine is not None:
            out["win_rate"][name] = interval(win_outcomes(mine, theirs[:, :g]), cfg)
            out["policy_means"][name] = interval(mine, cfg)
            out["reference_means"][name] = interval(theirs[:, :g], cfg)
    out["policy_means"]["length"] = interval(policy.length, cfg)
    out["reference_means"]["length"] = interval(reference.length[:, :g], cfg)
    if policy.kl is not None:
        out["policy_means"]["kl"] = interval(policy.kl, cfg)
    return out


def best_of_n_curve(reference: Samples, cfg: Config) -> list[dict[str, Any]]:
    """Best-of-N from the reference's M samples per prompt under the run's reward: [] without a reward."""
    if reference.reward is None:
        return []
    rows, n = [], 1
    while n <= cfg.eval.best_of_n:
        row: dict[str, Any] = {
            "n": n,
            "kl": best_of_n_kl(n),
            "reward": interval(best_of_n(reference.reward, reference.reward, n), cfg),
        }
        if reference.gold is not None:
            row["gold"] = interval(best_of_n(reference.reward, reference.gold, n), cfg)
        rows.append(row)
        n *= 2
    return rows


def rl_gold_points(ctx: StageContext) -> list[tuple[float, float]]:
    """(KL to the reference, mean gold reward) of every step of this run's RL stage, from metrics.jsonl; [] when
    the run had no RL stage or the task no gold reward."""
    from pipeline.recorder import read_events
    from pipeline.types import StepRow

    if not (ctx.run_dir / "metrics.jsonl").exists():
        return []
    steps = [e.metrics for e in read_events(ctx.run_dir, "rl") if isinstance(e, StepRow)]
    return [(m["kl/ref"], m["gold_reward/mean"]) for m in steps if "gold_reward/mean" in m and "kl/ref" in m]


def gao_fits(curve: list[dict[str, Any]], rl_points: list[tuple[float, float]]) -> dict[str, Any]:
    """Gao et al. 2022's forms fitted to the gold-reward gain against d = sqrt(KL): best-of-N's curve (gain over
    N = 1) and the RL steps' training samples (gain over the first step). Each fit needs three points or more.
    -> {"best_of_n": {alpha, beta, r2, d, gain}, "rl": {...}}, the forms that could be fitted."""
    points = {}
    if curve and "gold" in curve[0]:
        base = curve[0]["gold"]["mean"]
        points["best_of_n"] = [(row["kl"], row["gold"]["mean"] - base) for row in curve]
    if rl_points:
        points["rl"] = [(kl, gold - rl_points[0][1]) for kl, gold in rl_points]
    out = {}
    for form, pts in points.items():
        if len(pts) < 3:
            continue
        d = torch.tensor([max(kl, 0.0) ** 0.5 for kl, _ in pts])
        gain = torch.tensor([g for _, g in pts])
        fit = gao_fit(d, gain, form)
        out[form] = {"alpha": fit.alpha, "beta": fit.beta, "r2": fit.r2, "d": d.tolist(), "gain": gain.tolist()}
    return out


def calibration(ctx: StageContext) -> dict[str, Any]:
    """The reward model's accuracy and calibration on the held-out preference pairs; {} without a reward model or
    preference data."""
    cfg, dirs = ctx.cfg, [str(d) for d in ctx.reward_dirs()]
    if not dirs or (cfg.data.preferences is None and ctx.artifacts.task_dir is None):
        return {}
    rows = eval_rows(ctx, "preferences", Path(dirs[0]))
    columns = ([r[c] for r in rows] for c in ("prompt", "chosen", "rejected"))
    # the reward stage's scores of the same members on the same pairs, when this run trained them
    reuse = ctx.run_dir / "stages" / "reward" / HELDOUT_SCORES
    what = "eval: calibration, scoring the pairs"
    chosen, rejected = score_pairs(ctx.log, what, dirs, cfg.reward, *columns, reuse=reuse)
    margins = chosen - rejected  # [K, B]
    margin, disagreement = ensemble_mean_std(margins)
    correct = win_outcomes(margin, torch.zeros_like(margin))
    bins = cfg.eval.calibration_bins
    cal = calibration_bins(*preference_probabilities(margin), bins)
    out: dict[str, Any] = {
        "pairs": len(rows),
        "members": len(dirs),
        "accuracy": interval(correct, cfg),
        "ece": cal.ece,
        "bins": [
            {"low": lo, "high": hi, "confidence": c, "frequency": f, "count": n}
            for lo, hi, c, f, n in zip(
                cal.edges[:-1].tolist(),
                cal.edges[1:].tolist(),
                cal.confidence.tolist(),
                cal.frequency.tolist(),
                cal.count.tolist(),
                strict=True,
            )
            if n > 0
        ],
    }
    if len(dirs) > 1:
        error = 1.0 - correct
        xs, ys, counts = quantile_bins(disagreement, error, bins)
        out["disagreement"] = [
            {"std": x, "error": y, "count": n}
            for x, y, n in zip(xs.tolist(), ys.tolist(), counts.tolist(), strict=True)
        ]
        corr = torch.corrcoef(torch.stack([disagreement.double(), error.double()]))[0, 1].item()
        out["disagreement_error_corr"] = corr if corr == corr else None  # NaN when either is constant
    return out


def headline(report: dict[str, Any]) -> dict[str, float]:
    """summary.json entries: eval/<name> for each mean, with _low and _high for its interval."""
    out: dict[str, float] = {}

    def add(key: str, iv: dict[str, float]) -> None:
        out[key], out[f"{key}_low"], out[f"{key}_high"] = iv["mean"], iv["low"], iv["high"]

    names = {"reward": "reward", "gold": "gold_reward", "kl": "kl", "length": "length"}
    for name, iv in report["win_rate"].items():
        add(f"eval/win_rate_{names[name]}", iv)
    for name, iv in report["policy_means"].items():
        add(f"eval/{names[name]}", iv)
    for name, iv in report["reference_means"].items():
        add(f"eval/{names[name]}_reference", iv)
    if report["best_of_n"]:
        top = report["best_of_n"][-1]
        out["eval/best_of_n"] = top["n"]
        if "gold" in top:
            add("eval/best_of_n_gold_reward", top["gold"])
    cal = report["calibration"]
    if cal:
        add("eval/rm_accuracy", cal["accuracy"])
        out["eval/rm_ece"] = cal["ece"]
    return out


def describe(summary: dict[str, float]) -> list[str]:
    """Progress lines: `eval: win_rate_gold_reward 0.613 [0.571, 0.652]`, one per headline number."""
    lines = []
    for key, value in summary.items():
        if key.endswith(("_low", "_high")):
            continue
        bounds = f" [{summary[key + '_low']:.3f}, {summary[key + '_high']:.3f}]" if key + "_low" in summary else ""
        shown = str(value) if isinstance(value, int) else f"{value:.3f}"
        lines.append(f"eval: {key.removeprefix('eval/')} {shown}{bounds}")
    return lines

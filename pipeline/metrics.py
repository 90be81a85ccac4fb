"""metrics.jsonl read back, and the plots of a run: plots/*.png of the RL steps, the eval stage's figures
(DESIGN.md run-directory contract). pipeline/recorder.py writes metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.types import StepRow

PLOTS = {  # file name -> (title, metric keys drawn on it)
    "reward.png": ("reward being optimized", ["reward/mean"]),
    "gold_reward.png": ("gold reward of sampled responses", ["gold_reward/mean"]),
    "kl.png": ("KL to the reference", ["kl/ref"]),
}


def read_metrics(run_dir: Path, stage: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def plot_metrics(steps: Iterable[StepRow], plots_dir: Path) -> list[Path]:
    """One line plot per entry of PLOTS with data, over the RL steps; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"step": s.step, **s.metrics} for s in steps]
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in PLOTS.items():
        series = {
            k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float) and math.isfinite(r[k])]
            for k in keys
        }
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for key, points in series.items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(keys[0])
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots_dir / name)
        plt.close(fig)
        written.append(plots_dir / name)
    if overoptimization := plot_overoptimization(rows, plots_dir / "overoptimization.png"):
        written.append(overoptimization)
    return written


OVEROPTIMIZATION_KEYS = ("kl/ref", "reward/mean", "gold_reward/mean")


def plot_overoptimization(rows: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """The proxy reward (what RL optimizes, left axis) and the gold reward (right axis) of each RL step's samples
    against that step's KL to the reference (Gao et al. 2023, "Scaling laws for reward model overoptimization"):
    the proxy keeps rising with KL while the gold one flattens or falls once the policy exploits the proxy.
    Points are joined in step order. Needs steps with all of OVEROPTIMIZATION_KEYS (a task with a gold reward);
    returns None otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(r: dict[str, Any], key: str) -> bool:
        return isinstance(r.get(key), int | float) and math.isfinite(r[key])

    points = [r for r in rows if all(finite(r, k) for k in OVEROPTIMIZATION_KEYS)]
    if not points:
        return None
    kl = [r["kl/ref"] for r in points]
    fig, proxy_ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    gold_ax = proxy_ax.twinx()  # the two rewards have different scales: one axis each
    proxy_ax.plot(kl, [r["reward/mean"] for r in points], marker="o", markersize=3, color="tab:blue")
    gold_ax.plot(kl, [r["gold_reward/mean"] for r in points], marker="s", markersize=3, color="tab:orange")
    proxy_ax.set_xlabel("KL to the reference (per sequence, mean over the step's samples)")
    proxy_ax.set_ylabel("proxy reward (reward/mean)", color="tab:blue")
    gold_ax.set_ylabel("gold reward (gold_reward/mean)", color="tab:orange")
    proxy_ax.set_title(f"reward over-optimization: {len(points)} RL steps")
    proxy_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errors(iv: dict[str, float]) -> list[list[float]]:
    """An interval {mean, low, high} as matplotlib's asymmetric error bar [[below], [above]]."""
    return [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]


def plot_best_of_n(report: dict[str, Any], path: Path) -> list[Path]:
    """eval_best_of_n.png: gold reward (left) and the optimized reward (right) of best-of-N from the reference
    against the analytic KL of best-of-N, with the policy's own (KL, mean) point; bands and bars are the bootstrap
    intervals. One panel when the optimized reward is the gold reward. Nothing is drawn without a best-of-N curve."""
    curve = report["best_of_n"]
    if not curve:
        return []
    plt = _pyplot()
    panels = [(k, label) for k, label in (("gold", "gold reward"), ("reward", "reward (optimized)")) if k in curve[0]]
    if len(panels) == 2 and all(row["gold"] == row["reward"] for row in curve):  # the run optimizes the gold reward
        panels = [("gold", "gold reward (= the optimized reward)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), dpi=110, squeeze=False)
    kl = [row["kl"] for row in curve]
    policy = report["policy_means"]
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        mean = [row[key]["mean"] for row in curve]
        ax.fill_between(kl, [row[key]["low"] for row in curve], [row[key]["high"] for row in curve], alpha=0.25)
        ax.plot(kl, mean, marker="o", markersize=4, label="best-of-N from the reference")
        for row, x, y in zip(curve, kl, mean, strict=True):
            ax.annotate(f"N={row['n']}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7)
        if key in policy:
            ax.errorbar(
                policy["kl"]["mean"],
                policy[key]["mean"],
                xerr=_errors(policy["kl"]),
                yerr=_errors(policy[key]),
                fmt="*",
                markersize=12,
                color="C3",
                capsize=3,
                label="policy",
            )
        ax.set_xlabel("KL to the reference (nats): log N - (N-1)/N for best-of-N")
        ax.set_ylabel(f"mean {label}")
        ax.set_title(f"{label}: best-of-N vs the policy")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path]


def plot_gao(fits: dict[str, Any], path: Path) -> list[Path]:
    """eval_gao.png: gold-reward gain against d = sqrt(KL), the points with Gao et al.'s fitted curves (best-of-N:
    d (a - b d); RL steps: d (a - b log d)). Nothing is drawn without a fit."""
    if not fits:
        return []
    import torch

    from pipeline.algo import GaoFit, gao_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2), dpi=110)
    labels = {"best_of_n": "best-of-N", "rl": "RL steps (training samples)"}
    for i, (form, fit) in enumerate(fits.items()):
        d = torch.tensor(fit["d"], dtype=torch.float64)
        grid = torch.linspace(0.0, float(d.max()) * 1.05, 100, dtype=torch.float64)
        curve = gao_curve(GaoFit(form, fit["alpha"], fit["beta"], fit["r2"]), grid)
        ax.scatter(fit["d"], fit["gain"], s=14, color=f"C{i}", label=f"{labels.get(form, form)}")
        ax.plot(
            grid.tolist(),
            curve.tolist(),
            color=f"C{i}",
            label=f"fit: a={fit['alpha']:.3f} b={fit['beta']:.3f} R2={fit['r2']:.2f}",
        )
    ax.set_xlabel("d = sqrt(KL to the reference)")
    ax.set_ylabel("gold reward gain")
    ax.set_title("Gao et al. 2022 fits")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path]


def plot_calibration(cal: dict[str, Any], path: Path) -> list[Path]:
    """eval_calibration.png: reliability diagram of the reward model's Bradley-Terry probability on held-out
    pairs (left; point area ~ pairs in the bin), and for an ensemble the error rate against member disagreement
    (right). Nothing is drawn without a calibration."""
    if not cal:
        return []
    plt = _pyplot()
    ensemble = "disagreement" in cal
    fig, axes = plt.subplots(1, 2 if ensemble else 1, figsize=(10.4 if ensemble else 5.2, 4.4), dpi=110, squeeze=False)
    ax = axes[0][0]
    bins = cal["bins"]
    total = sum(b["count"] for b in bins)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.plot([b["confidence"] for b in bins], [b["frequency"] for b in bins], color="C0")
    ax.scatter(
        [b["confidence"] for b in bins],
        [b["frequency"] for b in bins],
        s=[20 + 600 * b["count"] / total for b in bins],
        color="C0",
        zorder=3,
        label="reward model",
    )
    acc = cal["accuracy"]
    ax.set_title(
        f"{cal['pairs']} held-out pairs: accuracy {acc['mean']:.3f} "
        f"[{acc['low']:.3f}, {acc['high']:.3f}], ECE {cal['ece']:.3f}",
        fontsize=9,
    )
    ax.set_xlabel("predicted P(preferred) = sigmoid(r_a - r_b)")
    ax.set_ylabel("observed frequency preferred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if ensemble:
        ax = axes[0][1]
        rows = cal["disagreement"]
        ax.plot([r["std"] for r in rows], [r["error"] for r in rows], marker="o")
        corr = cal["disagreement_error_corr"]
        corr_text = "n/a" if corr is None else f"{corr:+.2f}"
        ax.set_title(f"{cal['members']} members: error vs disagreement (corr {corr_text})", fontsize=9)
        ax.set_xlabel("ensemble std of the margin r_chosen - r_rejected (equal-count bins)")
        ax.set_ylabel("error rate (ensemble mean misorders the pair)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path]

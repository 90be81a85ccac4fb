"""Where per-step metrics go: metrics.jsonl (one JSON object per step), TensorBoard, a live progress line, and at
the end summary.json and plots/*.png (DESIGN.md run-directory contract)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

PLOTS = {  # file name -> (title, metric keys drawn on it)
    "reward.png": ("reward being optimized", ["reward/mean"]),
    "gold_reward.png": ("gold reward of sampled responses", ["gold_reward/mean"]),
    "kl.png": ("KL to the reference", ["kl/ref"]),
}


class MetricsLog:
    """Appends one step's metrics to metrics.jsonl and TensorBoard and prints a progress line."""

    def __init__(self, run_dir: Path, *, total_steps: int, stage: str = "rl", out: TextIO = sys.stdout):
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.stage = stage
        self.out = out
        self._tb = None
        self._tb_dir = run_dir / "tb"
        self._started = time.monotonic()
        self._first_step: int | None = None

    def write(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": self.stage, **metrics}) + "\n")
        self._tensorboard().add_scalars_flat(step, metrics)
        self.out.write(self.progress_line(metrics) + "\n")
        self.out.flush()

    def progress_line(self, metrics: dict[str, Any]) -> str:
        step = int(metrics["step"])
        parts = [f"[{self.stage}] step {step}/{self.total_steps}"]
        if "eval/prompts" in metrics:  # an evaluation row, not a training step
            parts.append("eval")
            for key, value in metrics.items():
                if key.startswith("eval/") and key != "eval/prompts":
                    parts.append(f"{key.removeprefix('eval/')} {value:+.4f}")
            return "  ".join(parts)
        if self._first_step is None:  # the ETA counts from the first step this process ran
            self._first_step, self._started = step - 1, time.monotonic() - float(metrics.get("timing/step", 0.0))
        done = step - self._first_step
        eta = (time.monotonic() - self._started) / max(done, 1) * (self.total_steps - step)
        parts.append(f"eta {eta:4.0f}s")
        for key, label in (("reward/mean", "reward"), ("gold_reward/mean", "gold"), ("kl/ref", "kl")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:+.4f}")
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.0f} samples/s")
        return "  ".join(parts)

    def _tensorboard(self):
        if self._tb is None:
            self._tb = _TensorBoard(self._tb_dir)
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class _TensorBoard:
    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def add_scalars_flat(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(run_dir: Path, stage: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def truncate_metrics(run_dir: Path, *, stage: str, after_step: int) -> None:
    """Drop the rows of `stage` past `after_step`: a resumed run writes them again."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = read_metrics(run_dir)
        keep = [r for r in rows if r.get("stage") != stage or r["step"] <= after_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def rl_summary(rows: list[dict[str, Any]], *, wall_s: float) -> dict[str, Any]:
    """summary.json keys of the `rl` stage from its per-step rows (DESIGN.md)."""
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    samples = sum(r.get("samples", 0) for r in rows)
    tokens = sum(r.get("tokens", 0) for r in rows)
    busy = sum(r.get("timing/step", 0.0) for r in rows)
    out: dict[str, Any] = {
        "steps": last["step"],
        "wall_s": wall_s,
        "samples_per_s": samples / busy if busy else 0.0,
        "tokens_per_s": tokens / busy if busy else 0.0,
        "reward/initial": first.get("reward/mean"),
        "reward/final": last.get("reward/mean"),
        "kl/final": last.get("kl/ref"),
        "mismatch/logprob_abs_max": max((r.get("mismatch/logprob_abs_max", 0.0) for r in rows), default=0.0),
    }
    if "gold_reward/mean" in first:
        out["gold_reward/initial"] = first["gold_reward/mean"]
        out["gold_reward/final"] = last["gold_reward/mean"]
    for key in sorted({k for r in rows for k in r if k.startswith("timing/") and k != "timing/step"}):
        out[key] = sum(r.get(key, 0.0) for r in rows)
    return out


def plot_metrics(rows: Iterable[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """One line plot per entry of PLOTS with data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in PLOTS.items():
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float) and math.isfinite(r[k])]
                  for k in keys}
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
            ax.errorbar(policy["kl"]["mean"], policy[key]["mean"], xerr=_errors(policy["kl"]),
                        yerr=_errors(policy[key]), fmt="*", markersize=12, color="C3", capsize=3, label="policy")
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


def plot_calibration(cal: dict[str, Any], path: Path) -> list[Path]:
    """eval_calibration.png: reliability diagram of the reward model's Bradley-Terry probability on held-out
    pairs (left; point area ~ pairs in the bin), and for an ensemble the error rate against member disagreement
    (right). Nothing is drawn without a calibration."""
    if not cal:
        return []
    plt = _pyplot()
    ensemble = "disagreement" in cal
    fig, axes = plt.subplots(1, 2 if ensemble else 1, figsize=(10.4 if ensemble else 5.2, 4.4), dpi=110,
                             squeeze=False)
    ax = axes[0][0]
    bins = cal["bins"]
    total = sum(b["count"] for b in bins)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.plot([b["confidence"] for b in bins], [b["frequency"] for b in bins], color="C0")
    ax.scatter([b["confidence"] for b in bins], [b["frequency"] for b in bins],
               s=[20 + 600 * b["count"] / total for b in bins], color="C0", zorder=3, label="reward model")
    acc = cal["accuracy"]
    ax.set_title(f"{cal['pairs']} held-out pairs: accuracy {acc['mean']:.3f} "
                 f"[{acc['low']:.3f}, {acc['high']:.3f}], ECE {cal['ece']:.3f}", fontsize=9)
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

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
    return written

"""The results of a sweep: one row per trial (results.csv), the best trial, the one-screen table, the Spearman rank
correlation of a swept key with the final KL, and frontier.png (final reward and gold reward against final KL).

Pure functions of plain values (no Ray), so they can be tested without running a sweep."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

FINAL_KEYS = ("reward/final", "gold_reward/final", "kl/final")
STATUSES = ("completed", "early-stopped", "error", "unfinished")


def trial_status(tune_status: str, last_result: dict[str, Any]) -> str:
    """Tune's status of a trial and its last reported result -> one of STATUSES. A trial that Tune ended
    (TERMINATED) before it reported its final evaluation was stopped early by the scheduler (ASHA)."""
    if tune_status == "ERROR":
        return "error"
    if tune_status == "TERMINATED":
        return "completed" if last_result.get("final") else "early-stopped"
    return "unfinished"


def result_row(trial_id: str, params: dict[str, Any], tune_status: str, last_result: dict[str, Any]) -> dict[str, Any]:
    """One results.csv row: the trial, every swept key, the final metrics, RL steps run, status."""
    row: dict[str, Any] = {"trial": trial_id, **params}
    for key in FINAL_KEYS:
        row[key] = last_result.get(key)
    row["steps"] = last_result.get("step", 0)
    row["status"] = trial_status(tune_status, last_result)
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The completed trial with the highest (mode=max) or lowest metric; None when no trial completed."""
    done = [r for r in rows if r["status"] == "completed" and _finite(r.get(metric))]
    if not done:
        return None
    pick = max if mode == "max" else min
    return pick(done, key=lambda r: r[metric])


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties get mean ranks); nan when either
    side is constant or there are fewer than 2 points."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def key_vs_kl(rows: list[dict[str, Any]], key: str) -> float:
    """Spearman correlation of a numeric swept key with the final KL over the completed trials."""
    done = [r for r in rows if r["status"] == "completed" and _finite(r.get(key)) and _finite(r.get("kl/final"))]
    return spearman([float(r[key]) for r in done], [float(r["kl/final"]) for r in done])


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The one-screen table printed at the end of a sweep."""
    headers = ["trial", *keys, "reward", "gold", "KL", "steps", "status"]
    body = [
        [
            str(r["trial"]),
            *(_fmt(r.get(k)) for k in keys),
            *(_fmt(r.get(k)) for k in FINAL_KEYS),
            str(r["steps"]),
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


def plot_frontier(rows: list[dict[str, Any]], keys: list[str], path: Path) -> Path | None:
    """frontier.png: final reward (left) and final gold reward (right) against final KL, one point per trial,
    labelled with its swept values; completed trials are joined in order of KL, others drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if _finite(r.get("kl/final"))]
    if not points:
        return None
    titles = {"reward/final": "final reward", "gold_reward/final": "final gold reward (held-out)"}
    panels = [(k, t) for k, t in titles.items() if any(_finite(r.get(k)) for r in points)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        drawn = sorted((r for r in points if _finite(r.get(metric))), key=lambda r: r["kl/final"])
        done = [r for r in drawn if r["status"] == "completed"]
        ax.plot([r["kl/final"] for r in done], [r[metric] for r in done], color="tab:blue", alpha=0.4, zorder=1)
        stacked: dict[tuple[float, float], int] = {}  # labels of points at one spot go one above the other
        for r in drawn:
            spot = (round(r["kl/final"], 4), round(r[metric], 4))
            stacked[spot] = stacked.get(spot, -1) + 1
            filled = r["status"] == "completed"
            ax.scatter(
                r["kl/final"], r[metric], s=45, zorder=2, color="tab:blue" if filled else "white", edgecolors="tab:blue"
            )
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(r.get(k))}" for k in keys)
            if not filled:
                label += f" ({r['status']})"
            ax.annotate(
                label,
                (r["kl/final"], r[metric]),
                textcoords="offset points",
                xytext=(6, 5 + 11 * stacked[spot]),
                fontsize=8,
            )
        ax.set_xlabel("final KL to the reference (per sequence)")
        ax.set_ylabel(metric)
        ax.set_title(f"{title} vs KL")
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

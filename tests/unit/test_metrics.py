import io
import json

import pytest

from pipeline.metrics import MetricsLog, plot_metrics, read_metrics, rl_summary, truncate_metrics


def rows(n):
    return [{"step": s, "reward/mean": 0.1 * s, "gold_reward/mean": 0.2 + 0.01 * s, "kl/ref": 0.001 * s,
             "samples": 64, "tokens": 640, "timing/step": 2.0, "timing/gen": 1.0, "timing/train": 0.5,
             "mismatch/logprob_abs_max": 1e-4 * s} for s in range(1, n + 1)]


def test_log_writes_jsonl_tensorboard_and_progress(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path, total_steps=3, out=out)
    for r in rows(3):
        log.write(r)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path, "rl")] == [1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["stage"] == "rl"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    line = out.getvalue().splitlines()[-1]
    assert "step 3/3" in line and "reward +0.3000" in line and "kl +0.0030" in line


def test_summary_hand_computed():
    s = rl_summary(rows(4), wall_s=10.0)
    assert s["steps"] == 4
    assert s["samples_per_s"] == pytest.approx(4 * 64 / 8.0)
    assert s["tokens_per_s"] == pytest.approx(4 * 640 / 8.0)
    assert s["reward/initial"] == pytest.approx(0.1) and s["reward/final"] == pytest.approx(0.4)
    assert s["gold_reward/initial"] == pytest.approx(0.21) and s["gold_reward/final"] == pytest.approx(0.24)
    assert s["mismatch/logprob_abs_max"] == pytest.approx(4e-4)
    assert s["timing/gen"] == pytest.approx(4.0) and "timing/step" not in s


def test_truncate_drops_rows_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, total_steps=5, out=io.StringIO())
    for r in rows(5):
        log.write(r)
    truncate_metrics(tmp_path, stage="rl", after_step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_plots_are_written(tmp_path):
    written = plot_metrics(rows(5), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["gold_reward.png", "kl.png", "overoptimization.png", "reward.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_overoptimization_plot_needs_a_gold_reward(tmp_path):
    # A run optimizing a reward with no gold reward beside it has nothing to compare the proxy with.
    no_gold = [{k: v for k, v in r.items() if k != "gold_reward/mean"} for r in rows(5)]
    written = plot_metrics(no_gold, tmp_path / "plots")
    assert "overoptimization.png" not in [p.name for p in written] and "reward.png" in [p.name for p in written]

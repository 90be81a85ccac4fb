from pipeline.metrics import plot_metrics
from pipeline.types import StepRow


def steps(n):
    return [
        StepRow(s, {"reward/mean": 0.1 * s, "gold_reward/mean": 0.2 + 0.01 * s, "kl/ref": 0.001 * s})
        for s in range(1, n + 1)
    ]


def test_plots_are_written(tmp_path):
    written = plot_metrics(steps(5), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["gold_reward.png", "kl.png", "overoptimization.png", "reward.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_overoptimization_plot_needs_a_gold_reward(tmp_path):
    # A run optimizing a reward with no gold reward beside it has nothing to compare the proxy with.
    no_gold = [StepRow(s.step, {k: v for k, v in s.metrics.items() if k != "gold_reward/mean"}) for s in steps(5)]
    written = plot_metrics(no_gold, tmp_path / "plots")
    assert "overoptimization.png" not in [p.name for p in written] and "reward.png" in [p.name for p in written]

"""Evaluation and resampling helpers of the offline stages (no Ray): win rate, bootstrap counts (pair accuracy:
tests/unit/algo/test_algo_offline.py)."""

import numpy as np
import pytest

from pipeline.stages.dpo import win_rate
from pipeline.stages.reward import bootstrap, pair_count


def test_win_rate_counts_ties_half():
    assert win_rate([0.5, 0.2, 0.3, 0.0], [0.1, 0.4, 0.3, 0.0]) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    with pytest.raises(ValueError, match="2 and 1"):
        win_rate([0.1, 0.2], [0.3])


def test_bootstrap_repeats_each_pair_a_poisson_count_that_depends_on_text_and_seed_only():
    n = 4000
    rows = {
        "prompt": np.array([f"p{i} ?" for i in range(n)], dtype=object),
        "chosen": np.array([f" c{i} ." for i in range(n)], dtype=object),
        "rejected": np.array([f" r{i} ." for i in range(n)], dtype=object),
    }
    out = bootstrap(rows, seed=3)
    counts = [pair_count(p, c, r, 3) for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"], strict=True)]
    assert len(out["prompt"]) == sum(counts)
    assert abs(np.mean(counts) - 1.0) < 0.05  # Poisson(1): mean 1, so an epoch keeps its size on average
    assert abs(np.mean(np.array(counts) == 0) - np.exp(-1)) < 0.03  # ~37% of pairs left out, as in a bootstrap
    # rows stay intact (columns repeated together), and a second call (another block split) gives the same counts
    kept = zip(out["prompt"], out["chosen"], out["rejected"], strict=True)
    assert all(p[1:-2] == c[2:-2] == r[2:-2] for p, c, r in kept)
    half = {k: v[: n // 2] for k, v in rows.items()}
    assert len(bootstrap(half, seed=3)["prompt"]) == sum(counts[: n // 2])
    assert [pair_count("p ?", " a .", " b .", s) for s in range(20)] != [pair_count("p ?", " a .", " b .", 0)] * 20

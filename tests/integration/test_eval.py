"""The `eval` stage end to end on a local Ray: vLLM rollout engines for the policy and the reference, a reward
worker, a reference worker, and the reward-model calibration as a Ray task.

The session's `raylign run configs/tiny_grpo.yaml` run (40 RL steps; the reward is the task's gold reward),
continued with an eval stage, backs the claims about a trained policy; the calibration test scores the held-out
pairs of that run's task with a two-member ensemble of reward models. Measured values are in the comments.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actors.reward import ModelScorer
from pipeline.algo import best_of_n_kl
from pipeline.config import load_config
from pipeline.metrics import plot_calibration
from pipeline.run import run
from pipeline.stages import Artifacts, StageContext
from pipeline.stages import eval as eval_stage
from pipeline.stages.evaluation import preference_accuracy
from pipeline.tasks.tiny_models import build_reward_model
from tests.integration.conftest import continue_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(grpo_cli_run, local_ray, tmp_path_factory):
    """The session's tiny_grpo CLI run (synth -> sft -> 40 GRPO steps of 32 x 8, the gold reward as reward),
    continued with an eval stage on 32 held-out prompts, best-of-16."""
    assert grpo_cli_run.returncode == 0, grpo_cli_run.stderr[-3000:]
    base = Path(grpo_cli_run.stdout.strip().splitlines()[-1])
    run_dir = continue_run(
        base,
        tmp_path_factory.mktemp("eval") / base.name,
        ["synth", "sft", "rl", "eval"],
        ["eval.num_prompts=32", "eval.best_of_n=16"],
    )
    lines = []
    run(load_config(None), resume=run_dir, log=lines.append)
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir, summary, json.loads((run_dir / "eval.json").read_text()), lines


def test_trained_policy_wins_against_its_reference_on_gold(trained_run):
    run_dir, summary, report, lines = trained_run
    artifacts = Artifacts.load(run_dir)
    assert report["policy"] == artifacts.policy and report["reference"] == artifacts.initial_policy
    assert report["reference"].endswith("stages/sft/policy")  # (the copied run's artifacts name the original's)
    assert report["prompts"] == 32 and artifacts.done[-1] == "eval"
    # Measured: gold win rate 0.652 [0.602, 0.701] after 40 steps; 0.5 is no better than the SFT reference.
    win = report["win_rate"]["gold"]
    assert win["low"] > 0.5 and win["low"] < win["mean"] < win["high"]
    assert (summary["eval/win_rate_gold_reward"], summary["eval/win_rate_gold_reward_low"]) == (win["mean"], win["low"])
    assert summary["eval/gold_reward"] > summary["eval/gold_reward_reference"]
    # The reward being optimized is the gold reward here, so both judges agree sample by sample.
    assert report["win_rate"]["reward"] == win
    # The policy moved away from the reference: a positive KL estimate, as in the RL stage's kl/ref.
    assert summary["eval/kl_low"] > 0.1
    assert 1 <= summary["eval/length"] <= 32 and 1 <= summary["eval/length_reference"] <= 32
    assert "timing/eval" in summary and any(line.startswith("eval: win_rate_gold_reward") for line in lines)


def test_best_of_n_curve_rises_with_n(trained_run):
    run_dir, summary, report, _ = trained_run
    curve = report["best_of_n"]
    assert [row["n"] for row in curve] == [1, 2, 4, 8, 16]
    assert [row["kl"] for row in curve] == [best_of_n_kl(n) for n in (1, 2, 4, 8, 16)]
    gold = [row["gold"]["mean"] for row in curve]
    # Measured 0.62 -> 0.76 -> 0.86 -> 0.92 -> 0.96.
    assert all(b > a + 0.01 for a, b in zip(gold, gold[1:], strict=False))
    # N = 1 is plain sampling from the reference: the reference's own mean, up to sampling noise.
    assert abs(gold[0] - summary["eval/gold_reward_reference"]) < 0.05
    assert summary["eval/best_of_n_gold_reward"] == gold[-1]
    assert (run_dir / "plots/eval_best_of_n.png").stat().st_size > 10_000
    assert report["calibration"] == {} and not (run_dir / "plots/eval_calibration.png").exists()  # no reward model


def test_calibration_of_a_two_member_ensemble(trained_run, tmp_path):
    run_dir, _, _, _ = trained_run
    task = run_dir / "task"
    second = tmp_path / "member-1"  # another random-init reward model: the two members disagree
    tokenizer = AutoTokenizer.from_pretrained(task / "models/reward")
    build_reward_model(tokenizer, hidden_size=64, layers=1, seed=5).save_pretrained(second)
    tokenizer.save_pretrained(second)
    members = [str(task / "models/reward"), str(second)]
    cfg = load_config(run_dir / "config.yaml", ["stages=[eval]"])
    ctx = StageContext(cfg=cfg, run_dir=run_dir, artifacts=Artifacts.load(run_dir), log=lambda _: None)
    ctx.artifacts.reward = members
    cal = eval_stage.calibration(ctx)
    test_pairs = json.loads((task / "task.json").read_text())["rows"]["test_pairs"]
    assert cal["pairs"] == test_pairs and cal["members"] == 2
    # Each pair enters the reliability diagram in both orientations, so bins mirror around 0.5.
    assert sum(b["count"] for b in cal["bins"]) == 2 * test_pairs
    by_low = {round(b["low"], 3): b for b in cal["bins"]}
    for b in cal["bins"]:
        mirror = by_low[round(1 - b["high"], 3)]
        assert mirror["count"] == b["count"] and mirror["frequency"] == pytest.approx(1 - b["frequency"])
    # The accuracy is the one the reward stage reports for the same ensemble.
    rows = eval_stage.eval_rows(ctx, "preferences", task / "models/reward")
    prompts, chosen, rejected = ([r[c] for r in rows] for c in ("prompt", "chosen", "rejected"))
    scorer = ModelScorer.from_config(cfg.reward, members)  # in process, in one piece: not the stage's scorer actor
    accuracy = preference_accuracy(scorer.score(prompts, chosen), scorer.score(prompts, rejected))
    assert cal["accuracy"]["mean"] == pytest.approx(accuracy["ensemble"])
    assert len(cal["disagreement"]) == cfg.eval.calibration_bins
    stds = [r["std"] for r in cal["disagreement"]]
    assert stds == sorted(stds) and stds[0] > 0 and all(0 <= r["error"] <= 1 for r in cal["disagreement"])
    assert -1 <= cal["disagreement_error_corr"] <= 1
    (png,) = plot_calibration(cal, tmp_path / "eval_calibration.png")
    assert png.stat().st_size > 10_000
    assert 0 <= cal["ece"] <= 1

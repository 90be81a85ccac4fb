"""The `eval` stage without Ray: its config, its user errors (raised before any actor starts), the statistics it
derives from scored samples, its summary entries and its plots."""

import json

import matplotlib.image
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.metrics import plot_best_of_n, plot_calibration
from pipeline.stages import STAGES, Artifacts, StageContext, stage_function
from pipeline.stages import eval as eval_stage
from tests.conftest import REPO


def test_eval_is_a_stage_and_ends_the_default_pipeline():
    assert stage_function("eval") is eval_stage.run and "eval" in STAGES
    assert load_config(REPO / "configs/tiny_irl.yaml").stages[-1] == "eval"
    cfg = load_config(REPO / "configs/eval.yaml")
    assert cfg.stages == ["eval"] and cfg.eval.best_of_n == 64


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval.best_of_n=48", "eval.best_of_n"),
        ("eval.confidence=1", "eval.confidence"),
        ("eval.gold_reward=not a spec", "eval.gold_reward"),
        ("eval.bootstrap_resamples=10", "eval.bootstrap_resamples"),
    ],
)
def test_bad_eval_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/eval.yaml", [override])


def standalone(tmp_path, overrides) -> StageContext:
    cfg = load_config(REPO / "configs/eval.yaml", overrides)
    return StageContext(cfg=cfg, run_dir=tmp_path, artifacts=Artifacts(), log=lambda _: None)


def test_standalone_eval_names_the_missing_or_wrong_key(tmp_path, task_dir):
    policy = task_dir / "models/policy"
    with pytest.raises(ConfigError, match="model.policy is not set"):
        eval_stage.run(standalone(tmp_path, []))
    with pytest.raises(ConfigError, match=r"model\.policy = /nonexistent: not a model dir"):
        eval_stage.run(standalone(tmp_path, ["model.policy=/nonexistent"]))
    with pytest.raises(ConfigError, match=r"reference\.model = .*: not a model dir"):
        eval_stage.run(standalone(tmp_path, [f"model.policy={policy}", f"reference.model={task_dir}"]))
    with pytest.raises(ConfigError, match=r"eval\.gold_reward = 'nomodule:gold' cannot be imported"):
        eval_stage.run(standalone(tmp_path, [f"model.policy={policy}", "eval.gold_reward=nomodule:gold"]))
    with pytest.raises(ConfigError, match="data.prompts is not set"):
        eval_stage.run(standalone(tmp_path, [f"model.policy={policy}"]))


def test_reference_defaults_to_the_policy_before_training(tmp_path, task_dir):
    ctx = standalone(tmp_path, [f"model.policy={task_dir / 'models/policy'}"])
    assert eval_stage.reference_dir(ctx) == task_dir / "models/policy"  # nothing trained: itself
    ctx.artifacts.initial_policy = "/runs/x/stages/sft/policy"
    assert str(eval_stage.reference_dir(ctx)) == "/runs/x/stages/sft/policy"


def cfg_for_stats(resamples=200):
    return load_config(REPO / "configs/eval.yaml", [f"eval.bootstrap_resamples={resamples}"])


def test_compare_pairs_sample_i_with_sample_i_of_the_reference():
    # 2 prompts, G = 2 policy samples, M = 4 reference samples: only the reference's first 2 are paired.
    policy = eval_stage.Samples(
        reward=None,
        gold=torch.tensor([[1.0, 0.0], [0.5, 0.5]]),
        length=torch.tensor([[10.0, 12.0], [8.0, 6.0]]),
        kl=torch.tensor([[1.0, 3.0], [2, 2]]),
    )
    reference = eval_stage.Samples(
        reward=None,
        gold=torch.tensor([[0.5, 0.5, 9, 9], [0.5, 0.0, 9, 9]]),
        length=torch.tensor([[4.0, 4, 99, 99], [4, 4, 99, 99]]),
    )
    out = eval_stage.compare(policy, reference, cfg_for_stats())
    # outcomes [[1, 0], [0.5, 1]]: win rate 0.625; reward is absent.
    assert out["win_rate"]["gold"]["mean"] == 0.625 and "reward" not in out["win_rate"]
    assert out["reference_means"]["gold"]["mean"] == pytest.approx(0.375)
    assert out["reference_means"]["length"]["mean"] == 4.0
    assert out["policy_means"]["kl"]["mean"] == 2.0 and out["policy_means"]["length"]["mean"] == 9.0
    iv = out["win_rate"]["gold"]
    assert iv["low"] <= iv["mean"] <= iv["high"]


def test_best_of_n_curve_uses_the_reward_and_reports_gold():
    reward = torch.tensor([[1.0, 3.0, 2.0, 0.0]])  # the reward picks sample 1, then 2, ...
    gold = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    reference = eval_stage.Samples(reward=reward, gold=gold, length=torch.ones(1, 4))
    curve = eval_stage.best_of_n_curve(reference, load_config(None, ["eval.best_of_n=4"]))
    assert [row["n"] for row in curve] == [1, 2, 4]
    assert [row["kl"] for row in curve] == pytest.approx([0.0, 0.19314718, 0.63629436])
    # N = 2 by hand: 6 pairs, the higher reward's gold: {0,1}.9 {0,2}.5 {0,3}.1 {1,2}.9 {1,3}.9 {2,3}.5 -> 3.8 / 6
    assert [row["gold"]["mean"] for row in curve] == pytest.approx([0.45, 3.8 / 6, 0.9])
    assert curve[-1]["reward"]["mean"] == 3.0
    no_reward = eval_stage.Samples(reward=None, gold=gold, length=torch.ones(1, 4))
    assert eval_stage.best_of_n_curve(no_reward, load_config(None)) == []


def report_for_plots(gold_shift=0.0):
    iv = lambda m: {"mean": m, "low": m - 0.02, "high": m + 0.02}  # noqa: E731
    curve = [
        {"n": n, "kl": k, "reward": iv(0.5 + 0.1 * i), "gold": iv(0.5 + 0.1 * i - gold_shift * i)}
        for i, (n, k) in enumerate([(1, 0.0), (2, 0.193), (4, 0.636)])
    ]
    return {
        "win_rate": {"gold": iv(0.6), "reward": iv(0.7)},
        "policy_means": {"gold": iv(0.6), "reward": iv(0.7), "kl": iv(0.4), "length": iv(11.0)},
        "reference_means": {"gold": iv(0.5), "reward": iv(0.5), "length": iv(14.0)},
        "best_of_n": curve,
        "calibration": {
            "pairs": 3,
            "members": 2,
            "accuracy": iv(0.667),
            "ece": 0.1,
            "bins": [
                {"low": 0.2, "high": 0.3, "confidence": 0.25, "frequency": 0.0, "count": 3},
                {"low": 0.7, "high": 0.8, "confidence": 0.75, "frequency": 1.0, "count": 3},
            ],
            "disagreement": [{"std": 0.1, "error": 0.0, "count": 2}, {"std": 0.5, "error": 1.0, "count": 1}],
            "disagreement_error_corr": 0.9,
        },
    }


def test_headline_flattens_intervals_into_summary_keys():
    summary = eval_stage.headline(report_for_plots())
    assert summary["eval/win_rate_gold_reward"] == 0.6 and summary["eval/win_rate_gold_reward_low"] == 0.58
    assert summary["eval/gold_reward_reference"] == 0.5 and summary["eval/kl_high"] == pytest.approx(0.42)
    assert summary["eval/best_of_n"] == 4 and summary["eval/best_of_n_gold_reward"] == pytest.approx(0.7)
    assert summary["eval/rm_accuracy"] == 0.667 and summary["eval/rm_ece"] == 0.1
    json.dumps(summary)  # summary.json must be able to hold it
    lines = eval_stage.describe(summary)
    assert "eval: win_rate_gold_reward 0.600 [0.580, 0.620]" in lines and "eval: rm_ece 0.100" in lines


def test_plots_are_written_with_one_panel_per_distinct_reward(tmp_path):
    two = plot_best_of_n(report_for_plots(gold_shift=0.05), tmp_path / "two.png")
    one = plot_best_of_n(report_for_plots(gold_shift=0.0), tmp_path / "one.png")  # gold is the optimized reward
    width = {p.stem: matplotlib.image.imread(p).shape[1] for p in two + one}
    assert width["two"] > 1.8 * width["one"]
    report = report_for_plots()
    (cal,) = plot_calibration(report["calibration"], tmp_path / "cal.png")
    assert cal.stat().st_size > 10_000
    assert plot_best_of_n({**report, "best_of_n": []}, tmp_path / "none.png") == []
    assert plot_calibration({}, tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_gao_fits_take_gains_over_n_1_and_the_first_rl_step_and_are_drawn(tmp_path):
    from pipeline.metrics import plot_gao

    # best-of-N: KL 0, 1, 4 (d = 0, 1, 2), gold 0.5, 1.5, 1.5 -> gains 0, 1, 1 = d (1.5 - 0.5 d) exactly
    curve = [{"n": n, "kl": kl, "gold": {"mean": g}} for n, kl, g in ((1, 0.0, 0.5), (2, 1.0, 1.5), (4, 4.0, 1.5))]
    # RL steps: KL 0, 1, e^2 (d = 0, 1, e), gold 0.2 + d (0.4 - 0.2 log d): 0.2, 0.6, 0.2 + 0.2 e
    e = torch.e
    rl = [(0.0, 0.2), (1.0, 0.6), (float(e**2), 0.2 + 0.2 * float(e))]
    fits = eval_stage.gao_fits(curve, rl)
    assert fits["best_of_n"]["alpha"] == pytest.approx(1.5) and fits["best_of_n"]["beta"] == pytest.approx(0.5)
    assert fits["rl"]["alpha"] == pytest.approx(0.4) and fits["rl"]["beta"] == pytest.approx(0.2)
    assert fits["rl"]["r2"] == pytest.approx(1.0) and fits["rl"]["gain"][0] == 0.0
    assert eval_stage.gao_fits(curve[:2], []) == {}  # two points do not make a fit
    (png,) = plot_gao(fits, tmp_path / "eval_gao.png")
    assert matplotlib.image.imread(png).shape[0] > 100

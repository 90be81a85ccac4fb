"""The `irl` stage's pure parts: the summary over rounds, and the config that runs it."""

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.stages import STAGES, stage_function
from pipeline.stages.irl import irl_summary
from tests.conftest import REPO


def round_record(gold_before: float, gold_after: float, accuracy: float) -> dict:
    evals = [{"eval/gold_reward": gold_before, "eval/reward": 0.0, "eval/prompts": 64.0},
             {"eval/gold_reward": gold_after, "eval/reward": 1.0, "eval/prompts": 64.0}]
    return {"policy": "p", "reward": "r", "evals": evals, "discriminator": {"disc/accuracy": accuracy}}


def test_summary_takes_gold_before_the_first_round_and_after_the_last():
    summary = irl_summary([round_record(0.4, 0.5, 0.9), round_record(0.5, 0.55, 0.7), round_record(0.55, 0.6, 0.6)])
    assert summary["gold_reward/initial"] == 0.4 and summary["gold_reward/final"] == 0.6
    assert summary["irl/gold_reward_by_round"] == [0.5, 0.55, 0.6]
    assert summary["irl/disc_accuracy_by_round"] == [0.9, 0.7, 0.6]
    assert summary["irl/rounds"] == 3


def test_summary_without_a_gold_reward_has_no_gold_keys():
    record = round_record(0.0, 0.0, 0.8)
    record["evals"] = [{"eval/reward": 0.0, "eval/prompts": 64.0}] * 2
    assert "gold_reward/final" not in irl_summary([record])


def test_the_airl_config_runs_the_irl_stage_from_demonstrations_only():
    cfg = load_config(REPO / "configs/tiny_airl.yaml")
    assert cfg.stages == ["synth", "sft", "irl"] and "irl" in STAGES
    assert cfg.reward.function is None and cfg.reward.url is None  # no hand-written reward, no gold reward
    assert callable(stage_function("irl"))
    with pytest.raises(ConfigError, match="irl.rounds"):
        load_config(None, ["irl.rounds=0"])

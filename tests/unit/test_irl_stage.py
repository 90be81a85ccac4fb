"""The `irl` stage's pure parts: the summary over rounds, and the config that runs it."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.stages import STAGES, stage_function
from pipeline.stages.irl import irl_summary, kl_leash
from pipeline.stages.offline import demonstration_pairs
from tests.conftest import REPO


def round_record(gold_before: float, gold_after: float, accuracy: float) -> dict:
    evals = [
        {"eval/gold_reward": gold_before, "eval/reward": 0.0, "eval/prompts": 64.0},
        {"eval/gold_reward": gold_after, "eval/reward": 1.0, "eval/prompts": 64.0},
    ]
    return {"policy": "p", "reward": "r", "evals": evals, "discriminator": {"disc/accuracy": accuracy}}


def test_summary_takes_gold_before_the_first_round_and_after_the_last():
    summary = irl_summary([round_record(0.4, 0.5, 0.9), round_record(0.5, 0.55, 0.7), round_record(0.55, 0.6, 0.6)])
    assert summary["gold_reward/initial"] == 0.4 and summary["gold_reward/final"] == 0.6
    assert summary["irl/gold_reward_by_round"] == [0.5, 0.55, 0.6]
    assert summary["irl/disc_accuracy_by_round"] == [0.9, 0.7, 0.6]
    assert summary["irl/rounds"] == 3


def test_the_summary_reports_kl_and_reward_scale_per_round():
    first, second = round_record(0.4, 0.5, 0.9), round_record(0.5, 0.55, 0.7)
    first.update(kl=1.5, reward_scale=0.5)
    second.update(kl=2.5, reward_scale=0.25)
    summary = irl_summary([first, second])
    assert summary["irl/kl_by_round"] == [1.5, 2.5]
    assert summary["irl/reward_scale_by_round"] == [0.5, 0.25]


def test_round_one_pairs_each_demonstration_with_its_sample_only():
    demos = [{"prompt": "p0", "response": "d0"}, {"prompt": "p1", "response": "d1"}]
    assert demonstration_pairs(demos, ["s0", "s1"], [], seed=0) == [
        {"prompt": "p0", "chosen": "d0", "rejected": "s0"},
        {"prompt": "p1", "chosen": "d1", "rejected": "s1"},
    ]


def test_later_rounds_add_one_replayed_sample_per_demonstration_from_an_earlier_round_of_its_prompt():
    demos = [{"prompt": f"p{i}", "response": f"d{i}"} for i in range(200)]
    now = [f"now{i}" for i in range(200)]
    earlier = [[f"r1-{i}" for i in range(200)], [f"r2-{i}" for i in range(200)]]
    rows = demonstration_pairs(demos, now, earlier, seed=3)
    assert len(rows) == 400 and rows[:200] == demonstration_pairs(demos, now, [], seed=3)
    replayed = rows[200:]
    assert [r["prompt"] for r in replayed] == [d["prompt"] for d in demos]
    # each replayed sample is that prompt's sample in one of the earlier rounds, both rounds drawn
    assert all(r["rejected"].split("-")[1] == str(i) for i, r in enumerate(replayed))
    assert {r["rejected"].split("-")[0] for r in replayed} == {"r1", "r2"}
    assert demonstration_pairs(demos, now, earlier, seed=3) == rows  # seeded


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


def test_irl_method_is_adversarial_or_afd():
    assert load_config(None).irl.method == "adversarial"
    assert load_config(None, ["irl.method=afd"]).irl.method == "afd"
    with pytest.raises(ConfigError, match="irl.method"):
        load_config(None, ["irl.method=gail"])


def test_irl_discriminator_continues_or_starts_fresh_each_round():
    assert load_config(None).irl.discriminator == "continue"
    assert load_config(None, ["irl.discriminator=fresh"]).irl.discriminator == "fresh"
    with pytest.raises(ConfigError, match="irl.discriminator"):
        load_config(None, ["irl.discriminator=reset"])


def test_a_rounds_kl_leash_is_the_initial_policy_or_the_policy_the_round_starts_from():
    initial, round_start = Path("/run/stages/sft/policy"), "/run/stages/irl/round-1/stages/rl/policy"
    assert kl_leash(load_config(None).irl, round_start, initial) == initial
    assert kl_leash(load_config(None, ["irl.reference=round"]).irl, round_start, initial) == Path(round_start)
    with pytest.raises(ConfigError, match="irl.reference"):
        load_config(None, ["irl.reference=sft"])

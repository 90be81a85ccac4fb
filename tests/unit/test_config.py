import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.config import Config, LearnerConfig, load_config, merge_overrides, parse_override
from pipeline.errors import ConfigError
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "tiny_irl.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path):
    assert isinstance(load_config(path), Config)


def test_overrides_parse_yaml_values():
    assert parse_override("algo.kl.coef=0.1") == (["algo", "kl", "coef"], 0.1)
    assert parse_override("stages=[reward, rl]") == (["stages"], ["reward", "rl"])
    assert parse_override("run.name=x=y") == (["run", "name"], "x=y")


def test_overrides_merge_without_touching_input():
    data = {"algo": {"kl": {"coef": 0.5}}, "run": {"name": "a"}}
    merged = merge_overrides(data, ["algo.kl.coef=0.1", "rollout.temperature=0.7"])
    assert merged == {"algo": {"kl": {"coef": 0.1}}, "run": {"name": "a"}, "rollout": {"temperature": 0.7}}
    assert data["algo"]["kl"]["coef"] == 0.5


def test_override_values_reach_the_typed_config():
    cfg = load_config(REPO / "configs/tiny_irl.yaml", ["stages=[reward]", "algo.kl.coef=1e-3", "learner.zero_stage=3"])
    assert cfg.stages == ["reward"]
    assert cfg.algo.kl.coef == pytest.approx(1e-3)
    assert cfg.learner.zero_stage == 3


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError on assignment
        cfg.run.seed = 3


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.temperature=abc", "rollout.temperature = 'abc'"),
        ("rollout.temprature=1", "rollout.temprature: unknown key; allowed here: engine"),
        ("algo.name=ppoo", "algo.name = 'ppoo': Input should be 'ppo', 'grpo', 'rloo' or 'reinforce_pp'"),
        ("stages=[reward, bogus]", "stages[1] = 'bogus'"),
        ("learner.zero_stage=4", "learner.zero_stage = 4"),
        ("algo.kl.coef=-1", "algo.kl.coef = -1"),
        ("algo.kl.controller=adaptive", "algo.kl.target: is required when algo.kl.controller=adaptive"),
        ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt: = 1, but algo.name=grpo"),
        ("run.name.x=1", "run.name is a value"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_config_names_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/tiny_irl.yaml", [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(REPO / "configs/tiny_irl.yaml"), "algo.kl.coef=0.3"]) == 0
    out = capsys.readouterr().out
    assert "coef: 0.3" in out and "on_bad_rows: error" in out


@pytest.mark.parametrize(
    "override, key",
    [("rollout.temperature=abc", "rollout.temperature"), ("rollout.bogus=1", "rollout.bogus")],
)
def test_cli_bad_config_exits_2_with_one_line(override, key):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config", "show", "configs/tiny_irl.yaml", override],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "given, stage",
    [({}, 0), ({"num_workers": 2}, 2), ({"offload": True}, 2), ({"zero_stage": None}, 0), ({"zero_stage": 3}, 3)],
)
def test_the_zero_stage_defaults_to_0_on_one_rank_and_2_on_several(given, stage):
    assert LearnerConfig(**given).zero_stage == stage
    overrides = [f"learner.{k}={'null' if v is None else str(v).lower()}" for k, v in given.items()]
    assert load_config(REPO / "configs/tiny_grpo.yaml", overrides).learner.zero_stage == stage

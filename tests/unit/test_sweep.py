"""The pure parts of `raylign sweep`: search space -> Tune space, trial configs and the checks on swept keys, the
trial placement bundles, the results table, Spearman, the frontier plot, and restoring a trial's checkpoint from
Tune's copy. No Ray cluster is started."""

import json
import math
from pathlib import Path

import pytest

from cluster.plan import plan
from pipeline import checkpoint
from pipeline.cli import main
from pipeline.config import load_config, merge_overrides
from pipeline.errors import ConfigError
from pipeline.frontier import (
    best_row,
    key_vs_kl,
    plot_frontier,
    ranks,
    read_csv,
    result_row,
    spearman,
    table,
    trial_status,
    write_csv,
)
from pipeline.metrics import read_metrics
from pipeline.sweep import check_sweep, restore_checkpoint, trial_config, tune_space, with_values
from tests.conftest import REPO

KL = "algo.kl.coef"


def sweep_cfg(space: str, *more: str):
    return load_config(REPO / "configs/sweep_kl.yaml", [f"sweep.space={space}", *more])


def test_search_space_becomes_tune_space():
    from ray.tune.search.sample import Categorical, Float

    cfg = sweep_cfg(
        "{algo.kl.coef: {grid: [0.1, 1]}, learner.lr: {loguniform: [1e-5, 1e-3]}, "
        "rollout.temperature: {choice: [0.7, 1.0]}}"
    )
    space = tune_space(cfg.sweep.space)
    assert space[KL] == {"grid_search": [0.1, 1]}
    assert isinstance(space["learner.lr"], Float) and (space["learner.lr"].lower, space["learner.lr"].upper) == (
        1e-5,
        1e-3,
    )
    assert isinstance(space["learner.lr"].get_sampler(), Float._LogUniform)
    assert isinstance(space["rollout.temperature"], Categorical)
    assert space["rollout.temperature"].categories == [0.7, 1.0]


def test_sweep_kl_config_has_four_log_spaced_coefficients():
    cfg = load_config(REPO / "configs/sweep_kl.yaml")
    check_sweep(cfg)
    grid = cfg.sweep.space[KL].grid
    assert len(grid) == 4
    ratios = {round(b / a, 6) for a, b in zip(grid, grid[1:], strict=False)}
    assert len(ratios) == 1 and ratios.pop() > 1  # evenly spaced in log


def test_trial_config_sets_dotted_keys_without_touching_base():
    cfg = load_config(REPO / "configs/sweep_kl.yaml")
    base = cfg.model_dump(mode="json", by_alias=True)
    trial = trial_config(base, {KL: 1e-05, "learner.lr": 0.001})
    assert trial.algo.kl.coef == 1e-05 and trial.learner.lr == 0.001
    assert trial.algo.kl.mode == cfg.algo.kl.mode  # the rest is the base config
    assert base["algo"]["kl"]["coef"] == cfg.algo.kl.coef
    assert with_values({"a": {"b": 1}}, {"a.c.d": 2}) == {"a": {"b": 1, "c": {"d": 2}}}


def test_sweep_keys_and_run_overrides_set_dotted_keys_alike():
    # one setter (pipeline.config.set_dotted): the same dict, and the same error for a value in the way
    data = {"algo": {"kl": {"coef": 0.5}}, "run": {"name": "a"}}
    assert with_values(data, {"algo.kl.coef": 0.1, "rollout.temperature": 0.7}) == merge_overrides(
        data, ["algo.kl.coef=0.1", "rollout.temperature=0.7"]
    )
    with pytest.raises(ConfigError, match=r"sweep key 'run.name.x': run.name is a value \('a'\), not a section"):
        with_values(data, {"run.name.x": 1})
    with pytest.raises(ConfigError, match=r"override 'run.name.x=1': run.name is a value \('a'\), not a section"):
        merge_overrides(data, ["run.name.x=1"])


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ("{}", [], "sweep.space is empty"),
        ("{sft.epochs: {grid: [1, 2]}}", [], "sweep.space.sft.epochs: set once for the whole sweep"),
        ("{run.output_dir: {grid: [a, b]}}", [], "sweep.space.run.output_dir: set once"),
        ("{algo.kl.cof: {grid: [1]}}", [], "sweep.space.algo.kl.cof: no such config key"),
        ("{algo.kl.coef: {grid: [-1]}}", [], "sweep.space.algo.kl.coef: algo.kl.coef = -1"),
        ("{algo.kl.coef: {grid: [1]}}", ["stages=[synth, rl, sft]"], "needs it as the last stage"),
    ],
)
def test_bad_sweeps_name_the_key(space, extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_sweep(sweep_cfg(space, *extra))


def test_bad_search_space_is_a_config_error():
    with pytest.raises(ConfigError, match="loguniform needs 0 < low < high"):
        sweep_cfg("{algo.kl.coef: {loguniform: [1, 0.1]}}")
    with pytest.raises(ConfigError, match="give exactly one of grid, choice, loguniform"):
        sweep_cfg("{algo.kl.coef: {grid: [1], choice: [2]}}")
    with pytest.raises(ConfigError, match="sweep.metric"):
        load_config(None, ["sweep.metric=loss"])


def test_cli_sweep_bad_key_exits_2_with_one_line(capsys):
    assert main(["sweep", str(REPO / "configs/sweep_kl.yaml"), "sweep.space={sft.lr: {grid: [1]}}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.space.sft.lr" in err[0]


def test_trial_bundles_merge_groups_by_index_and_keep_the_total():
    cfg = load_config(None, ["algo.name=ppo", "learner.num_workers=2", "placement.colocate=[[reward, reference]]"])
    p = plan(cfg, device="gpu")
    bundles = p.trial_bundles()
    # bundle 0: rollout, reward+reference, learner 0, critic 0; bundle 1: learner 1, critic 1
    assert bundles == [{"CPU": 4.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 2.0}]
    summed = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    assert summed == p.total()
    # actor i of every role fits in bundle i, so spawning with bundle index i needs no offsets
    for rp in p.roles.values():
        for i in range(rp.count):
            need = rp.actor_resources(i)
            assert need["num_cpus"] <= bundles[i]["CPU"] and need["num_gpus"] <= bundles[i]["GPU"]


def test_trial_status():
    assert trial_status("TERMINATED", {"final": True, "step": 5}) == "completed"
    assert trial_status("TERMINATED", {"final": False, "step": 2}) == "early-stopped"
    assert trial_status("ERROR", {"step": 2}) == "error"
    for status in ("PENDING", "RUNNING", "PAUSED"):
        assert trial_status(status, {}) == "unfinished"


def rows():
    finals = [(0.01, 0.80, 0.78, 3.0), (0.1, 0.75, 0.74, 1.0), (1.0, 0.70, 0.71, 0.2), (10.0, 0.65, 0.66, 0.05)]
    out = [
        result_row(
            f"t{i}",
            {KL: c},
            "TERMINATED",
            {"final": True, "step": 20, "reward/final": r, "gold_reward/final": g, "kl/final": k},
        )
        for i, (c, r, g, k) in enumerate(finals)
    ]
    out.append(
        result_row(
            "t4",
            {KL: 0.5},
            "TERMINATED",
            {"final": False, "step": 4, "reward/final": 0.9, "gold_reward/final": 0.95, "kl/final": 0.5},
        )
    )
    return out


def test_result_rows_csv_and_best():
    r = rows()
    assert list(r[0]) == ["trial", KL, "reward/final", "gold_reward/final", "kl/final", "steps", "status"]
    assert r[4]["status"] == "early-stopped" and r[4]["steps"] == 4
    # the early-stopped trial has the highest gold reward but never finished: it cannot be the best
    assert best_row(r, "gold_reward/final", "max")["trial"] == "t0"
    assert best_row(r, "kl/final", "min")["trial"] == "t3"
    assert best_row([r[4]], "gold_reward/final", "max") is None


def test_csv_round_trip(tmp_path):
    write_csv(rows(), tmp_path / "results.csv")
    back = read_csv(tmp_path / "results.csv")
    assert len(back) == 5 and back[2][KL] == "1.0" and back[4]["status"] == "early-stopped"
    write_csv([result_row("p", {KL: 1.0}, "PENDING", {})], tmp_path / "pending.csv")
    assert read_csv(tmp_path / "pending.csv")[0]["kl/final"] == ""


def test_spearman_against_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap in 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert ranks([5, 1, 5, 3]) == [3.5, 1.0, 3.5, 2.0]
    # ties: Pearson of the mean ranks [1, 2.5, 2.5, 4] with [1, 2, 3, 4]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_key_vs_kl_uses_completed_trials_only():
    assert key_vs_kl(rows(), KL) == pytest.approx(-1.0)  # the early-stopped t4 would break the order


def test_table_fits_one_screen():
    text = table(rows(), [KL])
    lines = text.splitlines()
    assert len(lines) == 6 and max(len(line) for line in lines) <= 100
    assert lines[0].split() == ["trial", KL, "reward", "gold", "KL", "steps", "status"]
    assert "early-stopped" in lines[5] and "0.78" in lines[1]


def test_frontier_png(tmp_path):
    out = plot_frontier(rows(), [KL], tmp_path / "frontier.png")
    assert out is not None and out.stat().st_size > 20_000
    assert plot_frontier([result_row("p", {KL: 1.0}, "PENDING", {})], [KL], tmp_path / "none.png") is None


def test_restore_checkpoint_takes_tunes_copy_and_truncates_metrics(tmp_path):
    from ray.tune import Checkpoint

    run_dir = tmp_path / "trial"
    root = run_dir / "stages" / "rl" / "checkpoints"
    # the run dir got further (step 4) than Tune's copy (step 2), e.g. it was cut off before reporting step 4
    for step in (2, 4):
        checkpoint.save(
            root,
            step,
            {"epoch": 0},
            lambda d: (d / "learner").mkdir() or (d / "learner/w.pt").write_bytes(b"w" * 10),
            keep=5,
        )
    tune_copy = tmp_path / "tune_copy"
    import shutil

    shutil.copytree(root / "step-000002", tune_copy)
    (tune_copy / ".metadata.json").write_text("{}")  # a file Tune may add: not in the manifest
    rows_ = [{"stage": "rl", "step": s} for s in range(5)] + [{"stage": "sft", "step": 9}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))

    assert restore_checkpoint(run_dir, Checkpoint.from_directory(str(tune_copy))) == 2
    assert [p.name for p in checkpoint.complete(root)] == ["step-000002"]
    assert checkpoint.latest(root) == root / "step-000002"  # verifies: the extra file was left out
    assert [r["step"] for r in read_metrics(run_dir, "rl")] == [0, 1, 2]
    assert read_metrics(run_dir, "sft")  # other stages' rows stay

    assert restore_checkpoint(run_dir, None) is None  # no Tune checkpoint: a fresh start
    assert checkpoint.latest(root) is None and read_metrics(run_dir, "rl") == []


def test_configs_dir_has_sweep_kl():
    assert (Path(REPO) / "configs" / "sweep_kl.yaml").is_file()

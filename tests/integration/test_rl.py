"""The online RL stage end to end on CPU: real vLLM rollouts, DeepSpeed learners, weight sync every step.

Held-out gold reward is the mean over `run.eval_prompts` (64) test prompts x G (8) samples; its per-sample std is
~0.2 after SFT, so the standard error of a mean is ~0.01 and a rise of 0.04-0.05 is 4-5 standard errors."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.recorder import read_events
from pipeline.run import run
from pipeline.types import EvalRow, StepRow
from tests.conftest import REPO
from tests.integration.conftest import RAYLIGN, continue_run


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def steps_of(run_dir: Path) -> list[dict]:
    """The RL steps recorded in metrics.jsonl, each as {"step": s, **metrics}."""
    return [{"step": e.step, **e.metrics} for e in read_events(run_dir, "rl") if isinstance(e, StepRow)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """synth + sft once for the module; each test continues a copy of this run dir with its own rl stage."""
    import ray

    cfg = load_config(
        REPO / "configs/tiny_grpo.yaml", ["stages=[synth, sft]", f"run.output_dir={tmp_path_factory.mktemp('runs')}"]
    )
    run_dir = run(cfg, log=lambda _: SIGINT_AT_EACH_LINE.append(signal.getsignal(signal.SIGINT)))
    yield run_dir
    ray.shutdown()


SIGINT_AT_EACH_LINE: list = []  # the SIGINT handler in place when sft_run printed each of its lines


def test_ctrl_c_stays_a_clean_stop_after_a_ray_train_stage(sft_run):
    """Ray Train's fit installs a SIGINT handler of its own; the run's (stop at the next clean point) must be back
    for the stages after it: here the last line of the run, printed after the sft stage's fit."""
    from pipeline.run import StopRequest

    assert isinstance(SIGINT_AT_EACH_LINE[-1], StopRequest), SIGINT_AT_EACH_LINE[-1]


def continue_with_rl(base: Path, dest: Path, overrides: list[str]) -> Path:
    """A copy of `base` whose saved config adds the rl stage with `overrides`, ready for `--resume`."""
    return continue_run(base, dest, ["synth", "sft", "rl"], overrides)


def test_tiny_grpo_from_the_cli_raises_heldout_gold(grpo_cli_run):
    proc = grpo_cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    s = summary(run_dir)
    assert s["steps"] == 40
    assert s["gold_reward/final"] - s["gold_reward/initial"] >= 0.05, s
    assert s["mismatch/logprob_abs_max"] <= 1e-3  # the weights really are synced every step
    steps = steps_of(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 41))
    for key in (
        "reward/mean",
        "reward/std",
        "gold_reward/mean",
        "kl/ref",
        "policy/entropy",
        "policy/clip_frac",
        "response/length_mean",
        "mismatch/logprob_abs_max",
        "weight_version",
        "timing/gen",
        "timing/reward",
        "timing/ref",
        "timing/train",
        "timing/sync",
        "timing/other",
        "samples_per_s",
        "tokens_per_s",
    ):
        assert key in steps[-1], key
    assert steps[-1]["weight_version"] == 39  # sampled with the weights of the step before
    for name in ("reward.png", "gold_reward.png", "kl.png"):
        assert (run_dir / "plots" / name).stat().st_size > 5000
    assert any((run_dir / "tb").iterdir())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "models/policy")


def test_ppo_raises_heldout_gold(sft_run, tmp_path):
    run_dir = run(
        load_config(None),
        resume=continue_with_rl(sft_run, tmp_path / "ppo", ["algo.name=ppo", "run.max_steps=10", "learner.epochs=2"]),
        log=lambda _: None,
    )
    s = summary(run_dir)
    assert s["gold_reward/final"] - s["gold_reward/initial"] >= 0.04, s  # measured 0.640 -> 0.753
    assert s["mismatch/logprob_abs_max"] <= 1e-3


def test_a_reward_the_task_never_defined_is_optimized_by_two_engines_and_two_learners(sft_run, tmp_path):
    run_dir = run(
        load_config(None),
        resume=continue_with_rl(
            sft_run,
            tmp_path / "custom",
            [
                "reward.function=tests.integration.custom_reward:lo_share",
                "rollout.num_workers=2",
                "learner.num_workers=2",
                "run.max_steps=8",
            ],
        ),
        log=lambda _: None,
    )
    evals = [e.metrics for e in read_events(run_dir, "rl") if isinstance(e, EvalRow)]
    # the SFT policy uses "ka" and "lo" about equally often (reward ~0.5); measured 0.508 -> 0.880 in 8 steps
    assert evals[-1]["eval/reward"] - evals[0]["eval/reward"] >= 0.1, evals
    assert summary(run_dir)["mismatch/logprob_abs_max"] <= 1e-3


@pytest.mark.parametrize("lora", [[], ["lora.rank=8", "lora.stages=[rl]"]], ids=["full", "lora"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(sft_run, tmp_path, lora):
    """LoRA: the checkpoint holds the adapters and their optimizer state without the frozen base."""
    # 8 prompts a step (the config's 32 would only make each step slower): equality needs no more
    overrides = [
        "run.max_steps=6",
        "run.checkpoint_every=2",
        "run.eval_prompts=16",
        "rollout.prompts_per_step=8",
        *lora,
    ]
    whole = run(load_config(None), resume=continue_with_rl(sft_run, tmp_path / "whole", overrides), log=lambda _: None)
    cut = continue_with_rl(sft_run, tmp_path / "cut", overrides)
    proc = subprocess.Popen(
        [RAYLIGN, "run", "configs/tiny_grpo.yaml", "--resume", str(cut)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not any(r["step"] >= 2 for r in steps_of(cut)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    stopped_at = max(e.step for e in read_events(cut, "rl"))
    assert 2 <= stopped_at < 6
    run(load_config(None), resume=cut, log=lambda _: None)  # the CLI's --resume: the fault test below
    a, b = steps_of(whole), steps_of(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("reward/mean", "kl/ref", "loss/policy", "policy/grad_norm", "tokens"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5, abs=1e-7), key
    assert summary(cut)["gold_reward/final"] == pytest.approx(summary(whole)["gold_reward/final"], rel=1e-6)


def test_rloo_in_async_mode_samples_one_update_behind_and_learns(sft_run, tmp_path):
    run_dir = run(
        load_config(None),
        resume=continue_with_rl(
            sft_run,
            tmp_path / "async",
            ["algo.name=rloo", "rollout.async=true", "rollout.max_staleness=1", "algo.tis_cap=2.0", "run.max_steps=12"],
        ),
        log=lambda _: None,
    )
    steps = steps_of(run_dir)
    # step k's samples were launched before step k-1's update was synced: weights of step k-2
    assert [r["weight_version"] for r in steps] == [0, 0] + list(range(1, 11))
    s = summary(run_dir)
    assert s["gold_reward/final"] - s["gold_reward/initial"] >= 0.04, s


def kill_role(proc: subprocess.Popen, role: str) -> int:
    """SIGKILL the first process of `role` (Ray titles actor processes `ray::<Class>...`) under the run `proc`.
    -> its pid. Only the run's own descendants are looked at, never another Ray on the machine."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if title.startswith(f"ray::{role}"):
            child.kill()
            return child.pid
    raise AssertionError(f"no {role} process under the run")


def test_crashed_actors_restart_and_learner_failures_restart_or_stop(sft_run, tmp_path):
    # Real faults in a real run: SIGKILL the rollout and the reward worker; once their restarts are counted, a
    # learner: the run restarts from its last checkpoint by itself (run.max_failures=1); a learner again after the
    # next step: out of restarts, exit 1 with one line; then --resume to the end. A killed worker is counted when
    # Ray has restarted it and it is next used, at most two steps later.
    cut = continue_with_rl(
        sft_run,
        tmp_path / "faults",
        [
            "run.max_steps=6",
            "run.checkpoint_every=1",
            "run.max_failures=1",
            "run.eval_prompts=8",
            "rollout.prompts_per_step=8",
        ],
    )
    proc = subprocess.Popen(
        [RAYLIGN, "run", "configs/tiny_grpo.yaml", "--resume", str(cut)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # (worker restarts counted before the kill, the roles to kill)
    plan = [(0, ["RolloutWorker", "RewardWorker"]), (2, ["PolicyLearner"]), (2, ["PolicyLearner"])]
    deadline = time.monotonic() + 900
    while plan and proc.poll() is None and time.monotonic() < deadline:
        rows = steps_of(cut)
        if rows and rows[-1]["faults/restarts"] >= plan[0][0]:  # the workers killed so far are back
            for role in plan.pop(0)[1]:
                kill_role(proc, role)
            while len(steps_of(cut)) == len(rows):
                if proc.poll() is not None:  # expected only after the last kill
                    break
                time.sleep(0.5)  # wait for the next step
        time.sleep(0.5)
    _, err = proc.communicate(timeout=600)
    assert not plan and proc.returncode == 1, (plan, err[-3000:])
    assert "an actor died" in err and "--resume" in err, err[-3000:]
    resumed = subprocess.run(
        [RAYLIGN, "run", "configs/tiny_grpo.yaml", "--resume", str(cut)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = steps_of(cut)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # each step once: nothing lost or counted twice
    assert all(r["samples"] == 8 * 8 for r in steps)  # 8 prompts x 8 samples
    # the rollout and the reward worker came back, counted across the run's own restart from a checkpoint
    assert max(r["faults/restarts"] for r in steps) == 2
    # the restarted rollout worker sampled with the learners' current weights
    assert max(r["mismatch/logprob_abs_max"] for r in steps) <= 1e-3
    assert [r["weight_version"] for r in steps] == [0, 1, 2, 3, 4, 5]


def test_non_finite_rewards_skip_updates_then_stop_the_run(sft_run, tmp_path):
    from pipeline.errors import RunFailure

    cut = continue_with_rl(
        sft_run,
        tmp_path / "nan",
        [
            "reward.function=tests.integration.custom_reward:nan_reward",
            "run.max_steps=6",
            "run.max_bad_steps=2",
            "run.eval_prompts=8",
        ],
    )
    with pytest.raises(RunFailure, match=r"rl step 2: non-finite reward for 2 steps in a row"):
        run(load_config(None), resume=cut, log=lambda _: None)
    steps = steps_of(cut)
    assert [(r["step"], r["bad/skipped"], r["bad/reward"]) for r in steps] == [(1, 1.0, 1.0), (2, 1.0, 1.0)]
    assert not any("loss/policy" in r for r in steps)  # no update was made

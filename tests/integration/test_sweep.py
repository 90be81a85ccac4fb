"""`raylign sweep` end to end on a local Ray with real Ray Tune: trials in placement groups from the resource plan,
every RL step reported, an interrupted sweep resumed (only the unfinished trial runs), and ASHA's early stops
marked in results.csv. Tiny settings (HF generate, plain torch learner, 2-3 steps) keep the module short; the
4-trial KL sweep itself is measured by hand (README)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.frontier import read_csv
from tests.conftest import REPO

RAYLIGN = str(Path(sys.executable).parent / "raylign")
TINY = [
    "stages=[synth, rl]",
    "synth.num_prompts=64",
    "synth.policy_layers=2",
    "synth.policy_hidden_size=64",
    "rollout.engine=hf",
    "learner.backend=torch",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=2",
    "rollout.chunk_size=4",
    "rollout.max_new_tokens=8",
    "run.eval_prompts=4",
    "run.checkpoint_every=1",
]


def start(tmp_path: Path, *overrides: str, resume: Path | None = None) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"sweep-{time.monotonic_ns()}.log"
    args = [RAYLIGN, "sweep", "configs/sweep_kl.yaml", f"run.output_dir={tmp_path}", *TINY, *overrides]
    if resume is not None:
        args = [RAYLIGN, "sweep", "configs/sweep_kl.yaml", "--resume", str(resume)]
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text()


def starts(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "trial_starts.jsonl").read_text().splitlines()]


def test_interrupted_sweep_resumes_only_the_unfinished_trial(tmp_path):
    proc, log = start(tmp_path, "run.max_steps=2", "sweep.space={algo.kl.coef: {grid: [0.01, 10.0]}}")
    deadline = time.monotonic() + 400
    while "ended after" not in log.read_text():  # the first trial finished and Tune recorded it
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trial did not finish"
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc, log)
    assert rc == 130, out[-3000:]
    sweep_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    first = sweep_dir / "trials" / read_csv(sweep_dir / "results.csv")[0]["trial"]
    assert read_csv(sweep_dir / "results.csv")[0]["status"] == "completed"
    assert [r["status"] for r in read_csv(sweep_dir / "results.csv")][1:] == ["unfinished"]
    first_metrics = (first / "metrics.jsonl").read_bytes()

    rc, out = finish(*start(tmp_path, resume=sweep_dir))
    assert rc == 0, out[-3000:]
    assert str(sweep_dir) in out.splitlines()
    assert "stage synth finished before; skipped" in out  # the shared stage is not redone
    rows = read_csv(sweep_dir / "results.csv")
    assert len(rows) == 2 and [r["status"] for r in rows] == ["completed", "completed"]
    assert [float(r["algo.kl.coef"]) for r in rows] == [0.01, 10.0]
    assert all(int(r["steps"]) == 2 and r["kl/final"] and r["gold_reward/final"] for r in rows)
    # the finished trial did not run again; the other one ran (again) after the resume
    assert len(starts(first)) == 1 and (first / "metrics.jsonl").read_bytes() == first_metrics
    other = sweep_dir / "trials" / rows[1]["trial"]
    assert len(starts(other)) >= 1 and starts(other)[-1]["time"] > starts(first)[0]["time"]
    steps = [json.loads(line)["step"] for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]  # evaluation, two RL steps, final evaluation: each once
    best = load_config(sweep_dir / "best.yaml")
    assert best.algo.kl.coef in (0.01, 10.0) and best.run.max_steps == 2
    assert (sweep_dir / "frontier.png").stat().st_size > 20_000
    assert "trial" in out and "completed" in out  # the table


@pytest.mark.timeout(600)
def test_asha_stops_the_worse_trial_and_results_mark_it(tmp_path):
    space = (
        "sweep.space={reward.function: {grid: ['tests.integration.sweep_reward:words', "
        "'tests.integration.sweep_reward:minus_words']}}"
    )
    rc, out = finish(
        *start(
            tmp_path,
            "run.max_steps=3",
            space,
            "sweep.scheduler=asha",
            "sweep.grace_period=1",
            "sweep.metric=reward/final",
        )
    )
    assert rc == 0, out[-3000:]
    sweep_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = read_csv(sweep_dir / "results.csv")
    assert [r["status"] for r in rows] == ["completed", "early-stopped"], rows
    assert int(rows[0]["steps"]) == 3 and int(rows[1]["steps"]) == 1
    assert float(rows[0]["reward/final"]) >= 1 and float(rows[1]["reward/final"]) <= -1
    assert load_config(sweep_dir / "best.yaml").reward.function.endswith(":words")

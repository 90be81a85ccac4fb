"""Faults injected into real `raylign run` processes: SIGTERM, SIGKILL of the driver's whole process group, a
newer checkpoint cut off mid-write, and a bad data file. Each run is its own process group with its own local Ray,
so killing it never touches anyone else's Ray processes; the test checks that none of its own outlive it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import checkpoint
from pipeline.recorder import read_events
from pipeline.types import StepRow
from tests.conftest import REPO
from tests.unit.test_bad_data import prefs, write_jsonl

RAYLIGN = str(Path(sys.executable).parent / "raylign")
# RL from the synthetic (random-init) policy, no SFT, HF generate and plain torch learners: the driver's loop and
# its checkpoints are under test here, not learning or the engines (tests/integration/test_rl.py resumes vLLM and
# DeepSpeed after SIGINT). checkpoint_every=4 of 6 steps: a checkpoint at step 1-3 was written for a signal.
TINY = [
    "stages=[synth, rl]",
    "synth.num_prompts=128",
    "run.max_steps=6",
    "run.checkpoint_every=4",
    "rollout.prompts_per_step=16",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=16",
    "rollout.engine=hf",
    "learner.backend=torch",
    "run.eval_prompts=8",
]
RESUME = ["configs/tiny_grpo.yaml", "--resume"]
TIMEOUT_S = 600
STARTED: list[subprocess.Popen] = []


class Run:
    """`raylign run ...` in a new session (its own process group); stdout and stderr go to files."""

    def __init__(self, args: list[str], logs: Path):
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [RAYLIGN, "run", *args], cwd=REPO, stdout=out, stderr=err, start_new_session=True
            )
        STARTED.append(self.proc)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_until(self, ready, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S} s"
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        """The driver's child processes now: Ray's GCS, raylet, workers and actors of this run."""
        return psutil.Process(self.proc.pid).children(recursive=True)

    def finish(self) -> int:
        return self.proc.wait(timeout=TIMEOUT_S)


@pytest.fixture(scope="module", autouse=True)
def _kill_what_a_failed_test_left():
    yield
    for proc in STARTED:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group, nobody else's
            proc.wait()


def assert_all_gone(processes: list[psutil.Process], within_s: float = 60) -> None:
    """Every process of a finished or killed run exits by itself; any left is killed (it is ours) and fails."""
    _, alive = psutil.wait_procs(processes, timeout=within_s)
    left = [f"{p.pid} {p.name()}" for p in alive if p.is_running()]
    for p in alive:
        p.kill()
    assert not left, f"processes left behind: {left}"


def steps_done(run_dir: Path) -> list[int]:
    try:
        return [e.step for e in read_events(run_dir, "rl") if isinstance(e, StepRow)]
    except json.JSONDecodeError:  # a line being appended right now
        return []


def newest_step(run_dir: Path) -> int:
    latest = checkpoint.latest(run_dir / "stages/rl/checkpoints")
    return checkpoint.load_state(latest)["step"] if latest else 0


@pytest.fixture(scope="module")
def terminated(tmp_path_factory):
    """1. SIGTERM to the driver (as a scheduler sends it) once RL step 1 is logged. -> (run, run dir, processes
    the run had when signalled, the steps logged and the newest checkpoint's step when it had exited)."""
    out = tmp_path_factory.mktemp("faults")
    run = Run(["configs/tiny_grpo.yaml", *TINY, f"run.output_dir={out}"], out / "1")
    found: list[Path] = []

    def first_step_logged() -> bool:
        found[:] = list(out.glob("tiny_grpo-*"))
        return bool(found) and len(steps_done(found[0])) >= 1

    run.wait_until(first_step_logged, "RL step 1")
    processes = run.descendants()
    run.proc.send_signal(signal.SIGTERM)
    run.finish()
    return run, found[0], processes, steps_done(found[0]), newest_step(found[0])


@pytest.fixture(scope="module")
def killed(terminated):
    """2. The resumed run killed with SIGKILL, its whole process group at once, after step 4's checkpoint."""
    run_dir = terminated[1]
    run = Run([*RESUME, str(run_dir)], run_dir.parent / "2")
    run.wait_until(lambda: newest_step(run_dir) >= 4, "the step-4 checkpoint")
    processes = run.descendants()
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    return run, run_dir, processes


@pytest.fixture(scope="module")
def finished(killed):
    """3. What a kill during step 5's checkpoint write could leave: a temp dir, and a sealed dir whose largest
    file was cut short after sealing. Then resumed again, to the end. -> (run, run dir, the cut dir, its file)."""
    _, run_dir, _ = killed
    ckpts = run_dir / "stages/rl/checkpoints"
    shutil.copytree(ckpts / "step-000004", ckpts / ".tmp-step-000006")
    cut = shutil.copytree(ckpts / "step-000004", ckpts / "step-000005")
    weights = max((p for p in cut.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    run = Run([*RESUME, str(run_dir)], run_dir.parent / "3")
    run.finish()
    return run, run_dir, cut, weights.relative_to(cut)


def test_sigterm_checkpoints_the_step_and_exits_143(terminated):
    run, _, processes, steps, newest = terminated
    assert run.proc.returncode == 143, run.stderr()[-3000:]
    assert "interrupted by signal 15" in run.stderr()
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 4
    assert newest == steps[-1]  # not a checkpoint_every step: written for the signal
    assert_all_gone(processes)


def test_sigkill_of_the_process_group_leaves_no_process_and_the_last_checkpoint(terminated, killed):
    stopped = terminated[4]
    run, run_dir, processes = killed
    assert run.proc.returncode == -signal.SIGKILL
    assert f"rl: resumed from step-{stopped:06d} (step {stopped})" in run.stdout()
    assert_all_gone(processes)
    assert newest_step(run_dir) == 4 and not (run_dir / "stages/rl/checkpoints/step-000006").exists()


def test_resume_skips_a_cut_off_checkpoint_and_runs_to_the_end(finished):
    run, run_dir, cut, cut_file = finished
    assert run.proc.returncode == 0, run.stderr()[-3000:]
    out = run.stdout()
    assert f"checkpoint: skipping {cut}: {cut_file} does not match its checksum" in out
    assert "rl: resumed from step-000004 (step 4)" in out
    assert out.strip().splitlines()[-1] == str(run_dir)
    assert steps_done(run_dir) == [1, 2, 3, 4, 5, 6]  # each step once: the rows past step 4 were dropped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and "gold_reward/final" in summary
    ckpts = run_dir / "stages/rl/checkpoints"
    assert checkpoint.latest(ckpts) == ckpts / "step-000006" and not (ckpts / ".tmp-step-000006").exists()


def test_run_with_a_bad_data_file_exits_2_with_one_line(tmp_path):
    rows: list = prefs()
    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows]
    rows[5]["response"] = 7
    demos = write_jsonl(tmp_path / "demos.jsonl", rows)
    proc = subprocess.run(
        [
            RAYLIGN,
            "run",
            "configs/tiny_grpo.yaml",
            "stages=[synth, sft]",
            "synth.num_prompts=64",
            f"data.demos={demos}",
            f"run.output_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raylign: error:")]
    assert errors == [
        f"raylign: error: {demos}: row 5 (line 6): response has type int; expected a string or a messages list; "
        f"`raylign data check {demos} --kind demos` lists them all, data.on_bad_rows=skip drops them"
    ]
    assert "Traceback" not in proc.stderr


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    """Each run starts its own local Ray, never one named in the environment."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


LISTENERS = """
import json, psutil, ray
from pipeline.config import load_config
from pipeline.run import start_ray
start_ray(load_config(None), min_cpus=2)
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])  # workers too, not only GCS and raylet
me = psutil.Process()
listening = [[p.name(), c.laddr.ip] for p in [me, *me.children(recursive=True)]
             for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
print(json.dumps({"node": ray.nodes()[0]["NodeManagerAddress"], "listening": listening,
                  "dashboard": ray._private.worker._global_node.address_info.get("webui_url")}))
"""


def test_a_local_ray_listens_on_loopback_only():
    """The Ray that `raylign run` starts when RAY_ADDRESS is unset: nothing of it is reachable from another host
    (no socket on 0.0.0.0, ::, or the machine's own address), and it has no dashboard."""
    proc = subprocess.run(
        [sys.executable, "-c", LISTENERS], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["node"] == "127.0.0.1"
    names = {name for name, _ in found["listening"]}
    assert {"gcs_server", "raylet"} <= names and len(found["listening"]) >= 5, found
    exposed = [(n, ip) for n, ip in found["listening"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, exposed
    assert not found["dashboard"]

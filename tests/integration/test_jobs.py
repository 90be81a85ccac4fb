"""`raylign submit` and `raylign jobs` against a real local Ray head on 127.0.0.1 with token auth: a run submitted
with --wait succeeds and its log ends with the run's summary.json; a running job stops cleanly (the RL step in
progress finishes); a missing or wrong token is one line, exit 2.

The head has its own temp dir and ports, and its token in the environment (never ~/.ray/auth_token, which other
clusters on this machine may use); the client finds the token as a user's would: RAY_AUTH_TOKEN or a HOME's
~/.ray/auth_token."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.local import start_node, stop_node
from tests.conftest import REPO

pytestmark = pytest.mark.slow

RAYLIGN = str(Path(sys.executable).parent / "raylign")
# The synthetic task and 2 RL steps with the HF engine and plain-torch learner: ~40 s of job on 2 cores.
FAST = [
    "stages=[synth,rl]",
    "synth.num_prompts=64",
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=2",
    "rollout.engine=hf",
    "learner.backend=torch",
    "run.eval_prompts=8",
]


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="rlj-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token = secrets.token_hex(32)
    node = start_node(temp, num_cpus=8, env={"RAY_AUTH_TOKEN": token})
    try:
        yield node.dashboard_url, token
    finally:
        stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


def raylign(*args: str, token: str | None, home: Path | None = None, timeout: float = 600):
    """The CLI as a user runs it, with only the token sources given here (no RAY_* from this process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([RAYLIGN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_log(url: str, token: str, job_id: str, text: str, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = raylign("jobs", "logs", job_id, "--address", url, token=token).stdout
        if text in logs:
            return logs
        time.sleep(2)
    raise AssertionError(f"{text!r} not in the log of {job_id} after {timeout_s} s:\n{logs[-3000:]}")


def test_submit_wait_succeeds_and_the_log_ends_with_the_summary(head):
    url, token = head
    proc = raylign(
        "submit", "configs/tiny_grpo.yaml", "run.max_steps=2", *FAST, "--address", url, "--wait", token=token
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("raylign-tiny_grpo-")
    assert f"job {job_id} SUCCEEDED" in proc.stderr
    assert "[rl] step 2/2" in proc.stdout  # --wait streamed the log

    logs = raylign("jobs", "logs", job_id, "--address", url, token=token)
    assert logs.returncode == 0
    summary = json.loads(logs.stdout.split("summary.json:\n", 1)[1])
    assert summary["steps"] == 2 and "timing/rl" in summary and "kl/final" in summary
    status = raylign("jobs", "status", job_id, "--address", url, token=token)
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED")
    listing = raylign("jobs", "list", "--address", url, token=token)
    assert any(line.split()[:2] == [job_id, "SUCCEEDED"] for line in listing.stdout.splitlines())


def test_stop_lets_the_running_stage_finish_then_stops_the_job(head):
    url, token = head
    proc = raylign("submit", "configs/tiny_grpo.yaml", "run.max_steps=1000", *FAST, "--address", url, token=token)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    wait_for_log(url, token, job_id, "run: stage synth")  # the run's signal handler is in place from here
    stop = raylign("jobs", "stop", job_id, "--address", url, token=token)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip().endswith(f"{job_id}: STOPPED")
    logs = raylign("jobs", "logs", job_id, "--address", url, token=token).stdout
    assert "run: SIGINT: stopping after the current step" in logs  # the run's own clean stop, not a kill
    assert "interrupted by signal 2" in logs and "[rl] step 1000/1000" not in logs
    again = raylign("jobs", "stop", job_id, "--address", url, token=token)
    assert again.returncode == 0 and "already STOPPED" in again.stdout


def test_a_token_in_home_dot_ray_is_found(head, tmp_path):
    url, token = head
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(token + "\n")
    proc = raylign("jobs", "list", "--address", url, token=None, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ID")


def test_no_token_is_one_line_saying_how_to_give_one(head, tmp_path):
    url, _ = head
    proc = raylign("jobs", "list", "--address", url, token=None, home=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "requires a Ray auth token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr


def test_a_wrong_token_is_rejected_in_one_line(head, tmp_path):
    url, _ = head
    proc = raylign("submit", "configs/tiny_grpo.yaml", "--address", url, token="not-the-token", home=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "rejected the Ray auth token from RAY_AUTH_TOKEN" in proc.stderr


def test_unknown_job_and_bad_config_are_user_errors(head):
    url, token = head
    proc = raylign("jobs", "status", "raylign-nope", "--address", url, token=token)
    assert proc.returncode == 2 and "has no job raylign-nope" in proc.stderr
    proc = raylign("submit", "configs/tiny_grpo.yaml", "rollout.temprature=1", "--address", url, token=token)
    assert proc.returncode == 2 and "rollout.temprature: unknown key" in proc.stderr

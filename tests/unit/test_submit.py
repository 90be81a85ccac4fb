"""`raylign submit` / `jobs` pieces that need no cluster: address and token lookup, the job's entrypoint and
runtime_env. (The commands against a real Ray head: tests/integration/test_jobs.py.)"""

import shlex
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.submit import PROJECT, auth_token, dashboard_address, entrypoint, project_path, runtime_env, submission_id


@pytest.fixture
def no_ray_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_address_from_flag_then_api_server_env_then_ray_address(no_ray_env):
    no_ray_env.setenv("RAY_ADDRESS", "http://a:8265")
    assert dashboard_address(None) == "http://a:8265"
    no_ray_env.setenv("RAY_API_SERVER_ADDRESS", "http://b:8265/")
    assert dashboard_address(None) == "http://b:8265"
    assert dashboard_address("https://c:443") == "https://c:443"


def test_a_missing_or_non_url_address_is_a_user_error(no_ray_env):
    with pytest.raises(UserError, match="pass --address"):
        dashboard_address(None)
    no_ray_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, as `raylign run` takes
    with pytest.raises(UserError, match="RAY_ADDRESS=10.0.0.1:6379: jobs need the cluster's dashboard URL"):
        dashboard_address(None)


def test_token_from_env_then_token_path_then_home(no_ray_env, tmp_path):
    assert auth_token() == (None, None)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("path-token")
    no_ray_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token() == ("path-token", str(tmp_path / "tok"))
    no_ray_env.setenv("RAY_AUTH_TOKEN", " env-token ")
    assert auth_token() == ("env-token", "RAY_AUTH_TOKEN")


def test_an_empty_token_path_is_a_user_error(no_ray_env, tmp_path):
    no_ray_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH=.*missing: no token in that file"):
        auth_token()


def test_entrypoint_runs_the_config_into_a_job_dir_then_prints_its_summary():
    cmd = entrypoint(Path("configs/tiny_grpo.yaml"), ["stages=[synth, rl]", "run.name=a b"], "/shared/runs/job 1")
    run, summary = cmd.split(" && echo 'summary.json:' && ")
    assert shlex.split(run) == [
        "raylign",
        "run",
        "configs/tiny_grpo.yaml",
        "stages=[synth, rl]",
        "run.name=a b",
        "run.output_dir=/shared/runs/job 1",
    ]  # the job dir override comes last, so it wins
    assert summary == "cat '/shared/runs/job 1'/*/summary.json"


def test_the_config_must_be_inside_the_project(tmp_path):
    assert project_path(PROJECT / "configs" / "tiny_grpo.yaml") == Path("configs/tiny_grpo.yaml")
    with pytest.raises(UserError, match="must be inside"):
        project_path(tmp_path / "x.yaml")


def test_runtime_env_ships_the_project_without_venv_runs_and_caches(tmp_path):
    env = runtime_env(None, ["HF_HOME=/cache", "A=b=c"])
    assert env["working_dir"] == str(PROJECT) and "pip" not in env
    for pattern in ("/.venv", "/runs", ".git", "__pycache__"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["HF_HOME"] == "/cache" and env["env_vars"]["A"] == "b=c"
    assert env["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"  # reaches the run's clean-stop handler
    assert env["worker_process_setup_hook"] == "pipeline.ray_hooks.worker_setup"  # Ray Data's poll, as locally
    (tmp_path / "req.txt").write_text("# pinned\nvllm==0.1\n\nfoo>=2\n")
    assert runtime_env(tmp_path / "req.txt", [])["pip"] == ["vllm==0.1", "foo>=2"]
    with pytest.raises(UserError, match="--env X: expected KEY=VALUE"):
        runtime_env(None, ["X"])


def test_submission_ids_are_unique_and_path_safe():
    a, b = submission_id("my run/1"), submission_id("my run/1")
    assert a != b and a.startswith("raylign-my-run-1-") and "/" not in a and " " not in a


def test_a_resumed_job_continues_the_run_dir_and_prints_its_summary():
    cmd = entrypoint(Path("configs/tiny_grpo.yaml"), [], "/shared/runs/x-1", resume="/shared/runs/x-1")
    assert cmd == (
        "raylign run configs/tiny_grpo.yaml --resume /shared/runs/x-1 && echo 'summary.json:' && "
        "cat /shared/runs/x-1/summary.json"
    )

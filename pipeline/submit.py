"""`raylign submit` and `raylign jobs`: send a run to a Ray cluster through the Ray Jobs API, and follow it.

A job carries this checkout as its `working_dir` (without .venv, runs/ and caches) and runs `raylign run CONFIG
...` on the cluster, in the Python env of the cluster's nodes: that env must already hold raylign's dependencies
(the image built from cluster/Dockerfile, or the venv a local head was started from); `--requirements FILE` adds
a pip install per job instead. Each job writes its run dir under `<run.output_dir>/<job id>/`, so jobs never
share one and the job can print the run's summary.json at the end of its log.

Token auth (Ray 2.60): the token is found where Ray itself looks (RAY_AUTH_TOKEN, else the file named by
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and sent as `Authorization: Bearer <token>`, so the client works
whether or not RAY_AUTH_MODE is set in its own environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

PROJECT = Path(__file__).resolve().parents[1]
# gitignore patterns relative to the working dir; no trailing slash, so a match prunes the whole directory.
EXCLUDES = [
    "/.venv",
    "/runs",
    "/build",
    ".git",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".import_linter_cache",
    "*.pyc",
]
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN=<token>, or write it to ~/.ray/auth_token (or to a file named by "
    "RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the head node prints it"
)
STOP_WAIT_S = 120
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def dashboard_address(address: str | None) -> str:
    """The cluster's dashboard URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as Ray's own CLI)."""
    sources = [
        ("--address", address),
        *((name, os.environ.get(name)) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")),
    ]
    for source, value in sources:
        if value:
            if not value.startswith(("http://", "https://")):
                raise UserError(f"{source}={value}: jobs need the cluster's dashboard URL, e.g. http://HEAD:8265")
            return value.rstrip("/")
    raise UserError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")


def auth_token() -> tuple[str | None, str | None]:
    """-> (token, where it was found), looked up in the order Ray 2.60 uses; (None, None) when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: no token in that file; {TOKEN_HELP}")
        return token, str(path)
    path = Path.home() / ".ray" / "auth_token"
    token = path.read_text().strip() if path.is_file() else ""
    return (token, str(path)) if token else (None, None)


class Cluster:
    """A JobSubmissionClient for one dashboard URL, with the token attached and cluster errors turned into one-line
    UserErrors (exit 2): unreachable address, missing or rejected token, unknown job id."""

    def __init__(self, address: str | None):
        self.address = dashboard_address(address)
        self.token, self.token_source = auth_token()
        from ray.job_submission import JobSubmissionClient

        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)  # no upload or websocket notes on the terminal
        # It warns that .git and .venv are now left out by default: EXCLUDES leaves them out anyway.
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with self.errors():
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            if self.token is None:
                raise UserError(f"{self.address} requires a Ray auth token and none was found: {TOKEN_HELP}") from None
            raise UserError(
                f"{self.address} rejected the Ray auth token from {self.token_source}: {TOKEN_HELP}"
            ) from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError):
            raise UserError(
                f"cannot reach the Ray dashboard at {self.address}: is the cluster up and the URL "
                "right (the dashboard port, 8265 by default)?"
            ) from None
        except RuntimeError as e:
            if job_id is not None and "status code 404" in str(e):
                raise UserError(f"{self.address} has no job {job_id}; `raylign jobs list` shows its jobs") from None
            raise

    def info(self, job_id: str):
        with self.errors(job_id):
            return self.client.get_job_info(job_id)

    def follow(self, job_id: str) -> int:
        """Print the job's log as it grows until the job ends; -> 0 if it succeeded, 1 if it failed or was stopped.
        Ctrl-C stops following (130), not the job."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                print(chunk, end="", flush=True)

        self.info(job_id)  # an unknown id is a one-line error before the stream opens
        try:
            with self.errors(job_id):
                asyncio.run(tail())
        except KeyboardInterrupt:
            print(
                f"raylign: stopped following {job_id}; it keeps running (raylign jobs stop {job_id})", file=sys.stderr
            )
            return 130
        except RuntimeError as e:  # the log stream broke off; the job's status still tells how it ended
            print(f"raylign: lost the log stream of {job_id}: {e}", file=sys.stderr)
        return self.outcome(job_id)

    def wait(self, job_id: str, timeout_s: float):
        """The job's info once its status is terminal, or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        info = self.info(job_id)
        while not info.status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
            info = self.info(job_id)
        return info

    def outcome(self, job_id: str) -> int:
        """Print the job's final status (the log stream may close a moment before it is set); -> the exit code."""
        info = self.wait(job_id, timeout_s=30.0)
        status = str(info.status)
        print(f"raylign: job {job_id} {status}" + (f": {info.message}" if info.message else ""), file=sys.stderr)
        return EXIT_CODES.get(status, 1)


def submission_id(run_name: str) -> str:
    return f"raylign-{re.sub(r'[^A-Za-z0-9_.-]+', '-', run_name)}-{secrets.token_hex(4)}"


def project_path(path: Path) -> Path:
    """`path` relative to the project dir (the job's working_dir); a file outside it would not reach the job."""
    try:
        return path.resolve().relative_to(PROJECT)
    except ValueError:
        raise UserError(
            f"{path}: the config must be inside {PROJECT}, the directory sent to the cluster as the "
            "job's working_dir (copy it under configs/)"
        ) from None


def entrypoint(config: Path, overrides: list[str], job_dir: str, resume: str | None = None) -> str:
    """`raylign run` with the run dir under `job_dir`, then the run's summary.json (the only run dir there);
    with `resume`, `raylign run --resume` of that run dir (a path on the cluster) and its summary.json."""
    if resume is not None:
        run = shlex.join(["raylign", "run", str(config), "--resume", resume])
        return f"{run} && echo 'summary.json:' && cat {shlex.quote(resume)}/summary.json"
    run = shlex.join(["raylign", "run", str(config), *overrides, f"run.output_dir={job_dir}"])
    return f"{run} && echo 'summary.json:' && cat {shlex.quote(job_dir)}/*/summary.json"


def runtime_env(requirements: Path | None, env: list[str]) -> dict[str, Any]:
    from pipeline.ray_hooks import WORKER_SETUP
    from pipeline.run import QUIET_ENV

    # `jobs stop` signals the job, then kills it after RAY_JOB_STOP_WAIT_TIME_S (Ray's default, 3 s, is too short
    # to finish the RL step in progress and checkpoint it). SIGINT, not Ray's default SIGTERM: a Ray driver's own
    # SIGTERM handler exits at once, so only SIGINT reaches `raylign run`'s clean stop.
    env_vars = {**QUIET_ENV, "RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item}: expected KEY=VALUE")
        env_vars[key] = value
    out: dict[str, Any] = {
        "working_dir": str(PROJECT),
        "excludes": EXCLUDES,
        "env_vars": env_vars,
        "worker_process_setup_hook": WORKER_SETUP,
    }
    if requirements is not None:
        if not requirements.is_file():
            raise UserError(f"--requirements {requirements}: no such file")
        out["pip"] = [
            line.strip()
            for line in requirements.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config is an error here, not on the cluster
    config = project_path(Path(args.config))
    if args.resume and args.overrides:
        raise UserError("--resume continues the run dir's saved config: give no key=value overrides with it")
    job_id = submission_id(cfg.run.name)
    job_dir = args.resume or str(Path(cfg.run.output_dir) / job_id)
    cluster = Cluster(args.address)
    with cluster.errors():
        cluster.client.submit_job(
            entrypoint=entrypoint(config, args.overrides, job_dir, resume=args.resume),
            submission_id=job_id,
            runtime_env=runtime_env(Path(args.requirements) if args.requirements else None, args.env),
            metadata={"raylign_config": str(config), "raylign_run_dir_parent": job_dir},
        )
    where = f"continues {job_dir}" if args.resume else f"its run dir will be under {job_dir}/"
    print(
        f"raylign: submitted {job_id} to {cluster.address}; {where} on the cluster"
        + ("" if Path(job_dir).is_absolute() else " (relative to the job's working dir on the head node)"),
        file=sys.stderr,
    )
    print(job_id)
    return cluster.follow(job_id) if args.wait else 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors():
        jobs = cluster.client.list_jobs()
    print(f"{'ID':<40} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else ""
        entry = job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "..."
        print(f"{job.submission_id or job.job_id or '?':<40} {str(job.status):<10} {started:<19} {entry}")
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    info = Cluster(args.address).info(args.job_id)
    print(f"{args.job_id}: {info.status}")
    if info.message:
        print(f"  {info.message}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    if args.follow:
        return cluster.follow(args.job_id)
    with cluster.errors(args.job_id):
        print(cluster.client.get_job_logs(args.job_id), end="")
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    info = cluster.info(args.job_id)
    if info.status.is_terminal():
        print(f"{args.job_id}: already {info.status}")
        return 0
    with cluster.errors(args.job_id):
        cluster.client.stop_job(args.job_id)
    info = cluster.wait(args.job_id, timeout_s=args.timeout)
    print(f"{args.job_id}: {info.status}")
    if not info.status.is_terminal():
        print(f"raylign: {args.job_id} still {info.status} after {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `submit` and `jobs` on the `raylign` parser."""
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the cluster's dashboard URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)",
    )
    submit = commands.add_parser(
        "submit",
        parents=[address],
        help="run a config on a Ray cluster as a Ray job (prints the job id)",
        description="Validate CONFIG, then submit `raylign run CONFIG key=value ...` as a Ray job with this checkout "
        "as its working_dir. Prints the job id. The run dir goes under <run.output_dir>/<job id>/ on the cluster. "
        "The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. With --wait, follows the "
        "log and exits 0 if the job succeeded, 1 if it failed or was stopped.",
    )
    submit.add_argument("config", metavar="CONFIG", help="config file inside the project dir")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.max_steps=5 algo.kl.coef=0.1")
    submit.add_argument("--wait", action="store_true", help="follow the job's log; exit with its outcome")
    submit.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue this run dir (a path on the cluster's shared filesystem) with `raylign run --resume`",
    )
    submit.add_argument(
        "--requirements",
        default=None,
        metavar="FILE",
        help="pip requirements installed for the job (default: none, the cluster's env has them)",
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job's processes (repeatable)",
    )
    submit.set_defaults(func=cmd_submit)

    jobs = commands.add_parser("jobs", help="list, inspect, follow and stop Ray jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="SUBCOMMAND"
    )
    listing = jobs.add_parser("list", parents=[address], help="every job of the cluster: id, status, start")
    listing.set_defaults(func=cmd_jobs_list)
    status = jobs.add_parser("status", parents=[address], help="a job's status and message")
    status.add_argument("job_id", metavar="ID")
    status.set_defaults(func=cmd_jobs_status)
    logs = jobs.add_parser(
        "logs",
        parents=[address],
        help="a job's log (--follow: until it ends)",
        description="Print the job's log. With --follow, print it as it grows and exit with the "
        "job's outcome: 0 succeeded, 1 failed or stopped.",
    )
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("--follow", action="store_true", help="follow the log until the job ends")
    logs.set_defaults(func=cmd_jobs_logs)
    stop = jobs.add_parser("stop", parents=[address], help="stop a job (the run checkpoints its RL step, then exits)")
    stop.add_argument("job_id", metavar="ID")
    stop.add_argument(
        "--timeout",
        type=float,
        default=STOP_WAIT_S + 30.0,
        help=f"seconds to wait for the job to end (default {STOP_WAIT_S + 30})",
    )
    stop.set_defaults(func=cmd_jobs_stop)

"""The quiet console (pipeline/console.py): library output goes to the run dir's logs/, raylign's lines stay."""

import os
import subprocess
import sys

from pipeline.console import WorkerLog, verbose
from tests.conftest import REPO

PROBE = """
import logging, os, sys, warnings
from pathlib import Path
from pipeline.console import quiet_driver_logs
quiet_driver_logs(Path(sys.argv[1]))
logging.getLogger("ray.data").info("a Ray Data banner")
logging.getLogger("transformers").warning("a transformers warning")
warnings.warn("a library warning")
os.write(2, b"a C++ log line\\n")
print("raylign: own line", file=sys.stderr)
print("raylign: progress")
"""


def test_library_logs_go_to_the_driver_log_and_raylign_lines_to_the_console(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAYLIGN_VERBOSE"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "raylign: progress\n"
    assert out.stderr == "raylign: own line\n"
    log = (tmp_path / "logs" / "driver.log").read_text()
    for line in ("a Ray Data banner", "a transformers warning", "a library warning", "a C++ log line"):
        assert line in log


def test_verbose_leaves_everything_on_the_console(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIGN_VERBOSE", "1")
    assert verbose()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "logs")], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert "a transformers warning" in out.stderr and "a C++ log line" in out.stderr
    assert not (tmp_path / "logs").exists()


def test_worker_output_is_written_one_line_each_with_the_actor_and_pid(tmp_path):
    log = WorkerLog(tmp_path / "logs" / "workers.log")
    log({"lines": ["INFO vllm engine started", "WARNING set_num_threads"], "pid": 41, "actor_name": "RolloutWorker"})
    log({"lines": ["Failed to query Ray Train Controller actor state"], "pid": 7, "task_name": "cleaner"})
    assert (tmp_path / "logs" / "workers.log").read_text().splitlines() == [
        "(RolloutWorker pid=41) INFO vllm engine started",
        "(RolloutWorker pid=41) WARNING set_num_threads",
        "(cleaner pid=7) Failed to query Ray Train Controller actor state",
    ]

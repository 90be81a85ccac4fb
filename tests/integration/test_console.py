"""What a user sees of `raylign run configs/tiny_grpo.yaml` (the session's CLI run): raylign's own lines, none of
the libraries' messages, and those messages in the run dir's logs/."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Messages of Ray, Ray Train/Data, vLLM and DeepSpeed that used to fill the console (issue 19).
LIBRARY_LINE = re.compile(
    r"Failed to query Ray Train Controller|streaming_executor|logging_progress|Token authentication|"
    r"set_num_threads|\bpid=\d+|WARNING \d\d-\d\d|\[rank\d\]|core_worker\.cc|DeepSpeed|ds_accelerator|raylet|"
    r"real_accelerator|\] \[(DEBUG|INFO|WARNING|ERROR)\] \["  # DeepSpeed's own format: [time] [LEVEL] [file:line:fn]
)


def test_the_console_shows_raylign_lines_and_the_run_dir_keeps_the_library_logs(grpo_cli_run):
    assert grpo_cli_run.returncode == 0, grpo_cli_run.stderr[-2000:]
    console = grpo_cli_run.stdout.splitlines() + grpo_cli_run.stderr.splitlines()
    library = [line for line in console if LIBRARY_LINE.search(line) and not line.startswith("run: library logs")]
    assert library == []
    assert len(console) <= 150
    run_dir = Path(grpo_cli_run.stdout.splitlines()[-1])
    assert any(line.startswith("run: library logs") and str(run_dir / "logs") in line for line in console)
    workers = (run_dir / "logs" / "workers.log").read_text()
    assert "RolloutWorker pid=" in workers  # the vLLM engine's output, with the actor that printed it
    assert (run_dir / "logs" / "driver.log").exists()

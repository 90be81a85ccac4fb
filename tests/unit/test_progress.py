"""Progress lines of long phases (issue 19): done / total, rate and ETA, and the sweep's trial counts."""

from types import SimpleNamespace

from pipeline import progress
from pipeline.progress import Ticker, format_seconds, progress_line
from pipeline.sweep import describe_trials, steps_done


def test_a_progress_line_has_the_share_the_rate_and_the_eta_of_the_rate_so_far():
    # 3 of 8 in 15 s: 0.2 chunks/s, 5 left -> 25 s
    assert (
        progress_line("eval: sampling", 3, 8, 15.0, "chunks") == "eval: sampling 3/8 chunks (38%) 0.20 chunks/s eta 25s"
    )
    assert progress_line("eval: sampling", 0, 8, 15.0, "chunks") == "eval: sampling 0/8 chunks (0%) 0.00 chunks/s"
    assert format_seconds(125) == "2m 05s"


def test_the_ticker_speaks_once_per_interval_and_not_when_done(monkeypatch):
    clock = iter([0.0, 5.0, 21.0, 30.0, 45.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = []
    ticker = Ticker(lines.append, "work", 4, "parts", every_s=20.0)  # starts at t=0
    ticker.update(1)  # t=5: too soon
    ticker.update(2)  # t=21: a line, 2 parts in 21 s
    ticker.update(3)  # t=30: 9 s after the last line
    ticker.update(4)  # t=45: done, the caller says so itself
    assert lines == ["work 2/4 parts (50%) 0.10 parts/s eta 21s"]


def trial(status, step=None):
    return SimpleNamespace(status=status, last_result={"step": step} if step is not None else None)


def test_sweep_progress_counts_trials_by_status_and_steps_with_finished_trials_in_full():
    trials = [trial("TERMINATED", 6), trial("RUNNING", 4), trial("RUNNING", 2), trial("PENDING")]
    assert steps_done(trials, 10) == 16  # a trial ASHA stopped at step 6 counts as done: 10
    # 16 of 40 steps; 8 steps in the last 40 s: 0.2 steps/s, 24 left -> 2 min
    assert describe_trials(trials, 10, 40.0, 8) == (
        "sweep: trials 1 done, 2 running, 1 pending (of 4); RL steps 16/40 (40%) 0.20 steps/s eta 2m 00s"
    )


def test_a_long_step_gets_a_line_per_interval_and_its_result_or_error():
    import threading

    import pytest

    lines, release = [], threading.Event()

    def step():
        release.wait(5)
        return 42

    def after_two_lines(line):
        lines.append(line)
        if len(lines) == 2:
            release.set()

    assert progress.with_lines(step, after_two_lines, "rl: starting the learners", every_s=0.05) == 42
    assert lines == ["rl: starting the learners (0s)"] * 2

    def broken():
        raise ValueError("no engine")

    with pytest.raises(ValueError, match="no engine"):
        progress.with_lines(broken, lines.append, "x", every_s=0.05)

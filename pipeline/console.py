"""What a `raylign run` prints: raylign's own lines (stages, epochs, steps, progress with ETA, warnings to act on,
errors). The libraries' logs go to files in the run directory instead:
- `logs/driver.log`: this process's library loggers (Ray, Ray Data/Train/Tune, transformers, ...) and Python
  warnings;
- `logs/workers.log`: everything the Ray worker processes print (vLLM, DeepSpeed, Ray Train and Ray Data inside the
  actors), as Ray forwards it to the driver, one line each with the actor and pid.
`--verbose` (or RAYLIGN_VERBOSE=1) leaves them on the console, as Ray prints them."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VERBOSE_ENV = "RAYLIGN_VERBOSE"
LOG_DIR = "logs"
# Loggers that libraries configure with console handlers of their own; the rest reach the root logger.
LIBRARY_LOGGERS = ("ray", "vllm", "deepspeed", "transformers", "torch", "urllib3", "filelock", "py.warnings")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def cpu_accelerator_without_a_gpu() -> None:
    """Without a CUDA GPU, `DS_ACCELERATOR=cpu` (unless set): DeepSpeed's choice when it detects none, made up front.
    transformers' `save_pretrained` imports DeepSpeed (through accelerate) even in the driver, and DeepSpeed's
    detection prints a WARNING line of its own to stdout in every process, past the quiet console; set before Ray
    starts, the variable reaches the local workers too."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def set_verbose(on: bool) -> None:
    """`--verbose`: also for the processes started from here (the env var is inherited)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_driver_logs(log_dir: Path) -> Path | None:
    """Send this process's library logging, Python warnings and native (C++) stderr to `log_dir/driver.log`;
    Python's own `sys.stderr` stays the console, so raylign's errors still show. Safe to call again (after
    `ray.init`, which configures Ray's loggers anew). -> that file, None if verbose."""
    if verbose():
        return None
    global _driver_handler
    path = log_dir / "driver.log"
    if _driver_handler is None:
        import ray.data  # noqa: F401  (Ray Data configures its console logger once, on import: after it, not before)

        log_dir.mkdir(parents=True, exist_ok=True)
        _driver_handler = logging.FileHandler(path)
        _driver_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.captureWarnings(True)
        _redirect_native_stderr(path)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in LIBRARY_LOGGERS)]
    loggers += [
        logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in LIBRARY_LOGGERS
    ]
    for logger in loggers:
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        if logger.handlers or logger.name in LIBRARY_LOGGERS or logger is logging.getLogger():
            if _driver_handler not in logger.handlers:
                logger.addHandler(_driver_handler)
    return path


_driver_handler: logging.FileHandler | None = None


@contextlib.contextmanager
def into_driver_log(log_dir: Path) -> Iterator[None]:
    """While open, Python-level stderr also goes to `log_dir/driver.log`: `ray.init` sets Ray's console handlers up
    again and logs through them (they write to whatever `sys.stderr` is at the time) before they can be removed."""
    if verbose():
        yield
        return
    console = sys.stderr
    with (log_dir / "driver.log").open("a", buffering=1) as f:
        sys.stderr = f
        try:
            yield
        finally:
            sys.stderr = console


def _redirect_native_stderr(path: Path) -> None:
    """File descriptor 2 (what C++ code such as Ray's core worker writes to, and what the Ray processes started
    from here inherit) to `path`; `sys.stderr` keeps writing to the console through a copy of the old fd 2."""
    console = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = io.TextIOWrapper(io.FileIO(console, "w"), line_buffering=True, errors="backslashreplace")


class WorkerLog:
    """Ray's handler of the worker output it forwards (`log_to_driver=True`), writing to a file instead of the
    console: Ray's `print_logs` thread calls it with one dict per batch of lines of one process."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", buffering=1)

    def __call__(self, data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        pid = data.get("pid", "")
        for line in data.get("lines", []):
            self._file.write(f"({who} pid={pid}) {line}\n")


def route_worker_output(log_dir: Path) -> Path | None:
    """After `ray.init(log_to_driver=True)`: Ray workers' output goes to `log_dir/workers.log`, not the console.
    -> that file, None if verbose."""
    if verbose():
        return None
    import ray._private.worker as ray_worker

    handler = WorkerLog(log_dir / "workers.log")
    ray_worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")  # Ray's printer to stdout
    ray_worker.global_worker_stdstream_dispatcher.add_handler("raylign_worker_log", handler)
    # The cluster's own notes (raylet warnings such as "N PYTHON worker processes have been started") come through
    # Ray's error listener, which prints with this module function; an actor's death still reaches the run as an
    # exception, which raylign reports in one line.
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: handler(data)
    return handler.path

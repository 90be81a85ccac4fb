"""`raylign run`: start (or join) Ray, make the run dir, run the configured stages in order, export the models,
write summary.json, and return the run dir. A resumed run skips the stages it finished and continues the
interrupted one from its last complete checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config, to_yaml
from pipeline.console import LOG_DIR, into_driver_log, quiet_driver_logs, route_worker_output
from pipeline.errors import Interrupted, UserError
from pipeline.ray_hooks import WORKER_SETUP, worker_setup
from pipeline.report import write_report
from pipeline.stages import Artifacts, StageContext, stage_function

SUMMARY = "summary.json"
CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # see loopback_only
# Per-file progress bars of tokenizers/transformers in every actor would bury the run's own progress line.
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
}


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the running stage to stop at its next clean point (the RL
    loop checkpoints the step it finished, then returns); a second SIGINT stops at once."""

    def __init__(self, log):
        self.signum: int | None = None
        self.log = log

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"run: {signal.Signals(signum).name}: stopping after the current step (Ctrl-C again: now)")

    def requested(self) -> int | None:
        return self.signum


def start_ray(cfg: Config, min_cpus: float = 8, log_dir: Path | None = None, log=print) -> None:
    """Join the cluster in RAY_ADDRESS, else start a local Ray bound to 127.0.0.1 with enough logical CPUs for
    the resource plan (on a 2-core machine the actors mostly wait on each other, so oversubscribing is fine).
    With `log_dir`, the library logs of this process and of every Ray worker go to files there
    (pipeline/console.py), unless verbose."""
    import ray

    if ray.is_initialized():
        return
    if log_dir is not None and quiet_driver_logs(log_dir) is not None:
        log(f"run: library logs (Ray, vLLM, DeepSpeed, ...) go to {log_dir}/ (--verbose shows them here)")
    worker_setup()  # the driver runs Ray Data executions of its own (the prompt reader)
    with into_driver_log(log_dir) if log_dir is not None else contextlib.nullcontext():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            _start_local_ray(cfg, min_cpus)
    if log_dir is not None:
        quiet_driver_logs(log_dir)  # ray.init set Ray's loggers up again
        route_worker_output(log_dir)


def _start_local_ray(cfg: Config, min_cpus: float) -> None:
    import ray

    from cluster.plan import plan

    need = plan(cfg).total().get("CPU", 0.0) + 2  # + Ray Data and Ray Train coordinators
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with loopback_only():
        ray.init(
            num_cpus=int(max(min_cpus, need, os.cpu_count() or 1)),
            runtime_env={"env_vars": QUIET_ENV, "worker_process_setup_hook": WORKER_SETUP},
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While it is open, a local Ray started here listens on 127.0.0.1 only: GCS, raylet, workers and agents.

    Ray 2.60 turns a `_node_ip_address` of 127.0.0.1 into the machine's outward address, and then its servers
    listen on every interface, unless multi-node clusters are off (`ray_constants.ENABLE_RAY_CLUSTER`, read
    from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported): then the node address is the loopback one.
    The variable reaches the processes ray.init starts (their workers inherit it); this process imported Ray
    already, hence the constant. Both are restored afterwards, so a later `ray start` of a multi-node cluster
    from this process still works. tests/integration/test_faults.py checks every listening socket."""
    import ray._private.ray_constants as ray_constants

    saved = os.environ.get(CLUSTERS_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTERS_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(CLUSTERS_ENV, None)
        else:
            os.environ[CLUSTERS_ENV] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir.resolve()


def resume_run_dir(run_dir: Path) -> tuple[Path, Config]:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run dir (no config.yaml)")
    return run_dir.resolve(), load_config(run_dir / "config.yaml")


def run(cfg: Config, *, resume: Path | None = None, log=print) -> Path:
    """Run every stage of `cfg` (or of the resumed run dir's saved config); -> the run dir."""
    if resume is not None:
        run_dir, cfg = resume_run_dir(resume)
        log(f"run: resuming {run_dir} with its saved config.yaml")
    else:
        run_dir = new_run_dir(cfg)
        log(f"run: {run_dir}")
    return run_stages(cfg, run_dir, log)


def run_stages(cfg: Config, run_dir: Path, log=print) -> Path:
    """Run the stages of `cfg` that `run_dir` has not finished; the first SIGINT/SIGTERM stops at the next clean
    point and raises Interrupted. -> run_dir."""
    # first: ray.init installs a SIGTERM handler of its own (exit at once) that would replace ours
    start_ray(cfg, log_dir=run_dir / LOG_DIR, log=log)
    stop = StopRequest(log)
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_stages(cfg, run_dir, log, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_stages(cfg: Config, run_dir: Path, log, stop: StopRequest) -> Path:
    artifacts = Artifacts.load(run_dir)
    summary = read_summary(run_dir)
    started = time.perf_counter()
    for stage in cfg.stages:
        if stage in artifacts.done:
            log(f"run: stage {stage} finished before; skipped")
            continue
        log(f"run: stage {stage} ({cfg.stages.index(stage) + 1}/{len(cfg.stages)})")
        ctx = StageContext(cfg=cfg, run_dir=run_dir, artifacts=artifacts, log=log, stop=stop.requested)
        summary.update(stage_function(stage)(ctx))
        if signum := stop.requested():
            write_summary(run_dir, summary)
            raise Interrupted(signum)
        artifacts.done.append(stage)
        artifacts.save(run_dir)
        write_summary(run_dir, summary)
    export_models(run_dir, artifacts)
    summary["wall_s"] = summary.get("wall_s", 0.0) + time.perf_counter() - started
    write_summary(run_dir, summary)
    log(f"run: report {write_report(run_dir)}")
    return run_dir


def export_models(run_dir: Path, artifacts: Artifacts) -> None:
    """models/policy and models/reward: HF dirs of the final policy and reward model (members as reward-k); with
    LoRA, models/policy-adapter and models/reward-adapter too."""
    from actors.training.lora import ADAPTER_SUFFIX

    models = run_dir / "models"
    targets = []
    if artifacts.policy:
        targets.append((Path(artifacts.policy), models / "policy"))
    for k, path in enumerate(artifacts.reward):
        targets.append((Path(path), models / ("reward" if k == 0 else f"reward-{k}")))
    adapter = lambda d: d.with_name(d.name + ADAPTER_SUFFIX)  # noqa: E731  (LoRA: the adapter beside the model)
    targets += [(adapter(source), adapter(target)) for source, target in targets if adapter(source).is_dir()]
    for source, target in targets:
        if source.resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.exists() else {}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / SUMMARY)

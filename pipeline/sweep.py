"""`raylign sweep`: Ray Tune trials over config keys (the KL coefficient, or any other key the `rl` stage reads),
and the reward-vs-KL frontier.

A sweep dir (`<run.output_dir>/<run.name>-<timestamp>/`, printed last) holds:

    config.yaml    the sweep's resolved config
    shared/        a run dir with the stages before `rl` (synth, sft, ...): they run once and every trial starts
                   from their outputs, since no swept key reaches them (`check_sweep` refuses keys that would)
    trials/<id>/   one run dir per trial: config.yaml (its whole resolved config), metrics.jsonl, tb/, summary.json,
                   stages/rl/ (checkpoints, policy), trial_starts.jsonl (one line per start: fresh or resumed)
    tune/          the Ray Tune experiment: its state and each trial's checkpoints
    results.csv, best.yaml, frontier.png

A trial is a Tune function trainable that runs `train_iter` (the loop of `raylign run`) and reports every RL step.
Its actors live in the placement group Tune reserved for it from the resource plan (`ResourcePlan.trial_bundles`,
handed to the roles by `cluster.plan.within_trial`), so trials never oversubscribe the cluster. Whenever the loop
writes a checkpoint the trial reports it to Tune; a restored trial starts from Tune's copy, so `--resume` runs only
the trials that had not finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline import checkpoint
from pipeline.config import Config, SearchSpace, load_config, set_dotted, to_yaml, validate
from pipeline.errors import ConfigError
from pipeline.frontier import best_row, key_vs_kl, plot_frontier, result_row, table, write_csv
from pipeline.progress import EVERY_S, format_seconds
from pipeline.recorder import Recorder, truncate
from pipeline.run import Interrupted, new_run_dir, resume_run_dir, run_stages, start_ray, write_summary
from pipeline.stages import Artifacts, StageContext
from pipeline.types import EvalRow, LoopEvent, StepRow

SHARED, TRIALS, TUNE = "shared", "trials", "tune"
# Keys only the shared stages read (or that name the sweep itself): a trial cannot change them.
SHARED_ONLY = ("synth", "data", "model", "sft", "rm", "dpo", "stages", "sweep", "run.name", "run.output_dir")


def tune_space(space: dict[str, SearchSpace]) -> dict[str, Any]:
    """The sweep's search space as Tune's: dotted key -> grid_search / choice / loguniform."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, s in space.items():
        if s.grid is not None:
            out[key] = tune.grid_search(list(s.grid))
        elif s.choice is not None:
            out[key] = tune.choice(list(s.choice))
        elif s.loguniform is not None:  # the section's validator admits exactly one of the three
            out[key] = tune.loguniform(*s.loguniform)
    return out


def with_values(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with each dotted key of `params` set to its value."""
    out = json.loads(json.dumps(data))
    for key, value in params.items():
        set_dotted(out, key.split("."), value, source=f"sweep key {key!r}")
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The whole config of the trial with `params`; a bad value raises ConfigError naming the key."""
    return validate(with_values(base, params), source=f"sweep trial {params}")


def check_sweep(cfg: Config) -> None:
    """The sweep can run: `rl` is the last stage, the space is not empty, every swept key is one a trial can change
    and every value (the bounds of a log-uniform range) gives a valid config."""
    if "rl" not in cfg.stages or cfg.stages[-1] != "rl":
        raise ConfigError(f"stages = {cfg.stages}: a sweep runs `rl` in each trial and needs it as the last stage")
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one key, e.g. algo.kl.coef: {grid: [0.01, 0.1]}")
    base = cfg.model_dump(mode="json", by_alias=True)
    for key, s in cfg.sweep.space.items():
        shared = [p for p in SHARED_ONLY if key == p or key.startswith(p + ".")]
        if shared:
            raise ConfigError(
                f"sweep.space.{key}: set once for the whole sweep ({shared[0]} is read by the stages "
                f"the trials share, {shared_stages(cfg)}); trials can only change what `rl` reads"
            )
        if key not in _dotted_keys(base):
            raise ConfigError(f"sweep.space.{key}: no such config key")
        for value in s.grid or s.choice or list(s.loguniform or ()):
            validate(with_values(base, {key: value}), source=f"sweep.space.{key}")


def shared_stages(cfg: Config) -> list[str]:
    return [str(stage) for stage in cfg.stages[: cfg.stages.index("rl")]]


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _dotted_keys(value, prefix + key + ".")
    return out


# --- one trial (runs in the Tune trainable's process) ----------------------------------------------------------


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep_dir: str) -> None:
    """Tune function trainable: the `rl` stage of the trial's config from the shared stages' outputs, every step
    reported to Tune."""
    import ray
    from ray import tune

    from cluster.plan import within_trial
    from pipeline.rl import train_iter

    cfg = trial_config(base, config["params"])
    run_dir = Path(sweep_dir) / TRIALS / tune.get_context().get_trial_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    artifacts = Artifacts.load(Path(sweep_dir) / SHARED)  # outputs of the shared stages, by absolute path
    artifacts.save(run_dir)
    after = restore_checkpoint(run_dir, tune.get_checkpoint())
    with (run_dir / "trial_starts.jsonl").open("a") as f:
        f.write(json.dumps({"time": time.time(), "resumed_after_step": after}) + "\n")
    report = TrialReport(run_dir, cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line per step is enough
    ctx = StageContext(cfg=cfg, run_dir=run_dir, artifacts=artifacts)
    try:
        with within_trial(ray.util.get_current_placement_group()):
            for event in train_iter(cfg, ctx):
                report.add(event)
    finally:
        report.close()


def restore_checkpoint(run_dir: Path, tune_checkpoint: Any) -> int | None:
    """Make the trial's RL checkpoints those Tune holds (Tune's copy is the one that survives an interrupted sweep)
    and drop the metrics rows past it. -> the step it resumes after, None for a fresh start."""
    root = run_dir / "stages" / "rl" / "checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    step = None
    if tune_checkpoint is not None:
        with tune_checkpoint.as_directory() as d:
            step = checkpoint.load_state(Path(d))["step"]
            # only the files the checkpoint's manifest seals: Tune may add its own
            files = json.loads((Path(d) / checkpoint.MANIFEST).read_text())
            target = root / f"step-{step:06d}"
            for rel in [*files, checkpoint.MANIFEST]:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(d) / rel, target / rel)
    truncate(run_dir, stage="rl", after_step=-1 if step is None else step)
    return step


class TrialReport:
    """Records a trial's loop as the `rl` stage does (the one Recorder: metrics.jsonl, TensorBoard, progress line,
    summary.json) and reports every RL step to Tune with the final metrics so far; a step that wrote a checkpoint
    reports it too. The last step's report waits for the held-out evaluation after it, so it carries the final
    gold reward."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir, self.max_steps = run_dir, cfg.run.max_steps
        self.recorder = Recorder(run_dir, stage="rl", total_steps=cfg.run.max_steps)
        self.ckpt_root = run_dir / "stages" / "rl" / "checkpoints"

    def add(self, event: LoopEvent) -> None:
        self.recorder.add(event)
        match event:
            case EvalRow(final=True):
                # the last step as recorded: resumed from its checkpoint, the loop yields the evaluation only
                steps = [e for e in self.recorder.events() if isinstance(e, StepRow)]
                self._report(steps[-1] if steps else None, final=event)
            case StepRow(step=step) if step < self.max_steps:
                self._report(event)
            # the evaluation before step 1 is in metrics.jsonl only; after a Restart the recorder dropped the rows
            # that come again

    def _report(self, step: StepRow | None, final: EvalRow | None = None) -> None:
        from ray import tune

        metrics = step.metrics if step is not None else {}
        out: dict[str, Any] = {"step": step.step} if step is not None else {}
        out.update({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        out.update({"reward/final": metrics.get("reward/mean"), "kl/final": metrics.get("kl/ref")})
        out["final"] = final is not None
        if "gold_reward/mean" in metrics:
            out["gold_reward/final"] = metrics["gold_reward/mean"]
        if final is not None:
            out.update(final.metrics)
            if "eval/gold_reward" in final.metrics:
                out["gold_reward/final"] = final.metrics["eval/gold_reward"]
            write_summary(self.run_dir, self.recorder.summary())
        latest = checkpoint.latest(self.ckpt_root)
        if latest is not None and checkpoint.load_state(latest)["step"] == out.get("step"):
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(latest)))
        else:
            tune.report(out)

    def close(self) -> None:
        self.recorder.close()


# --- the driver ------------------------------------------------------------------------------------------------


def sweep(cfg: Config, *, resume: Path | None = None, log=print) -> Path:
    """Run the shared stages once, then the Tune trials, then write results.csv, best.yaml and frontier.png.
    -> the sweep dir. Raises Interrupted when a signal stopped it (`resume` continues it)."""
    if resume is not None:
        sweep_dir, cfg = resume_run_dir(resume)
        log(f"sweep: resuming {sweep_dir} with its saved config.yaml")
    check_sweep(cfg)
    if resume is None:
        sweep_dir = new_run_dir(cfg)
        log(f"sweep: {sweep_dir}")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials resolve relative paths (data, reward modules) as `run` does
    start_ray(cfg, min_cpus=cfg.sweep.max_concurrent * trial_cpus(cfg) + 2)
    artifacts = run_shared_stages(cfg, sweep_dir, log)
    if cfg.sweep.metric == "gold_reward/final" and artifacts.gold_reward is None:
        raise ConfigError("sweep.metric = gold_reward/final, but the task has no gold reward; use reward/final")
    grid = tuner(cfg, sweep_dir, log).fit()
    rows = collect_results(cfg, grid.experiment_path)
    write_outputs(cfg, sweep_dir, rows, log)
    if any(r["status"] == "unfinished" for r in rows):
        raise Interrupted(signal.SIGINT)
    return sweep_dir


def trial_cpus(cfg: Config) -> float:
    """CPUs of the biggest trial the grid and choice values give (each key's values taken one at a time)."""
    from cluster.plan import plan

    base = cfg.model_dump(mode="json", by_alias=True)
    values = [(k, v) for k, s in cfg.sweep.space.items() for v in (s.grid or s.choice or [])]
    configs = [cfg] + [trial_config(base, {k: v}) for k, v in values]
    return max(plan(c).total().get("CPU", 0.0) for c in configs)


def run_shared_stages(cfg: Config, sweep_dir: Path, log) -> Artifacts:
    """The stages before `rl`, once, in <sweep dir>/shared (resumed there like `raylign run --resume`)."""
    shared_dir = sweep_dir / SHARED
    shared_dir.mkdir(exist_ok=True)
    stages = shared_stages(cfg)
    if stages:
        shared_cfg = cfg.model_copy(update={"stages": stages})
        (shared_dir / "config.yaml").write_text(to_yaml(shared_cfg))
        log(f"sweep: shared stages {stages} in {shared_dir}")
        run_stages(load_config(shared_dir / "config.yaml"), shared_dir, log)
    artifacts = Artifacts.load(shared_dir)
    artifacts.save(shared_dir)
    return artifacts


def tuner(cfg: Config, sweep_dir: Path, log):
    """A new Tuner for the sweep, or the one restored from <sweep dir>/tune (unfinished and errored trials run
    again; finished ones are kept)."""
    from ray import tune

    from cluster.plan import plan, resolve_device

    base = cfg.model_dump(mode="json", by_alias=True)
    device = resolve_device(cfg)

    def resources(spec: dict[str, Any]):
        # an empty head bundle: the trainable itself only waits on its actors
        bundles = plan(trial_config(base, spec["params"]), device=device).trial_bundles()
        return tune.PlacementGroupFactory([{}, *bundles], strategy="PACK")

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, sweep_dir=str(sweep_dir)), resources)
    path = sweep_dir / TUNE
    if tune.Tuner.can_restore(str(path)):
        log(f"sweep: restoring the Tune experiment in {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
    sw = cfg.sweep
    scheduler = None
    if sw.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=cfg.run.max_steps,
            grace_period=sw.grace_period,
            reduction_factor=sw.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space={"params": tune_space(sw.space)},
        tune_config=tune.TuneConfig(
            metric=sw.metric,
            mode=sw.mode,
            num_samples=sw.num_samples,
            max_concurrent_trials=sw.max_concurrent,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(
            name=TUNE,
            storage_path=str(sweep_dir),
            verbose=0,
            callbacks=[Progress(cfg.run.max_steps)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )


class Progress(Callback):
    """One line when a trial starts, ends or fails (Tune's own table is off: verbose=0), and every EVERY_S seconds
    the trials done / running / left with the RL steps done of all trials'. Tune pickles its callbacks with the
    experiment, so this one prints rather than holding a log function."""

    def __init__(self, max_steps: int = 0):
        self.max_steps = max_steps  # run.max_steps: a trial's RL steps, unless ASHA stops it early
        self.start: tuple[float, int] | None = None  # (time, steps done) when this process first looked

    def on_step_end(self, iteration, trials, **info):
        now, steps = time.perf_counter(), steps_done(trials, self.max_steps)
        if self.start is None or self.start[0] > now:  # a restored experiment brings the old process's clock
            self.start, self.last = (now, steps), now
        if now - self.last >= EVERY_S:
            self.last = now
            print(describe_trials(trials, self.max_steps, now - self.start[0], steps - self.start[1]), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"sweep: trial {trial.trial_id} started: {trial.config['params']}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        steps = (trial.last_result or {}).get("step", 0)
        print(f"sweep: trial {trial.trial_id} ended after {steps} RL steps", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"sweep: trial {trial.trial_id} failed: see {trial.path}", flush=True)


def steps_done(trials: list, max_steps: int) -> int:
    """RL steps of all trials: a trial's last reported step; a finished one (ASHA may stop it early) in full."""
    return sum(max_steps if t.status == "TERMINATED" else (t.last_result or {}).get("step", 0) for t in trials)


def describe_trials(trials: list, max_steps: int, elapsed_s: float, steps_in_elapsed: int) -> str:
    """`sweep: trials 1 done, 2 running, 1 pending (of 4); RL steps 34/80 (42%) 0.31 steps/s eta 2m 28s`."""
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    running = sum(t.status == "RUNNING" for t in trials)
    line = f"sweep: trials {done} done, {running} running, {len(trials) - done - running} pending (of {len(trials)})"
    total = max_steps * len(trials)
    if total:
        steps = steps_done(trials, max_steps)
        rate = steps_in_elapsed / elapsed_s if elapsed_s > 0 else 0.0
        eta = f" eta {format_seconds((total - steps) / rate)}" if rate > 0 and steps < total else ""
        line += f"; RL steps {steps}/{total} ({100 * steps / total:.0f}%) {rate:.2f} steps/s{eta}"
    return line


def collect_results(cfg: Config, experiment_path: str) -> list[dict[str, Any]]:
    """One row per trial, in trial order, from the Tune experiment's state."""
    from ray import tune

    trials = tune.ExperimentAnalysis(experiment_path).trials
    return [
        result_row(t.trial_id, t.config["params"], t.status, t.last_result or {})
        for t in sorted(trials, key=lambda t: t.trial_id)
    ]


def write_outputs(cfg: Config, sweep_dir: Path, rows: list[dict[str, Any]], log) -> None:
    """results.csv, best.yaml (the best completed trial's whole config), frontier.png, and the table."""
    keys = list(cfg.sweep.space)
    write_csv(rows, sweep_dir / "results.csv")
    best = best_row(rows, cfg.sweep.metric, cfg.sweep.mode)
    if best is not None:
        shutil.copyfile(sweep_dir / TRIALS / best["trial"] / "config.yaml", sweep_dir / "best.yaml")
    plot_frontier(rows, keys, sweep_dir / "frontier.png")
    log(table(rows, keys))
    if best is not None:
        log(
            f"best trial ({cfg.sweep.metric}, {cfg.sweep.mode}): {best['trial']} "
            f"{ {k: best[k] for k in keys} }: {cfg.sweep.metric} {best[cfg.sweep.metric]:.4f}"
        )
    for key in keys:
        rho = key_vs_kl(rows, key)
        if rho == rho:  # not nan
            log(f"Spearman rank correlation of {key} with the final KL: {rho:+.2f}")

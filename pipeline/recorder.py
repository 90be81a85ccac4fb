"""The one consumer of the RL loop's events (`StepRow | EvalRow | Restart` from `pipeline.rl.train_iter`), shared
by the `rl` stage, the `irl` stage's rounds and the sweep's trials: it writes metrics.jsonl (one JSON object per
row), TensorBoard and a progress line, drops the rows that come again after a restart or a resume, and builds the
summary.json entries of the loop (DESIGN.md run-directory contract).

A metrics.jsonl row is `{"stage", "step", metrics...}` for a step and `{"stage", "step", ["final": true,]
"eval/...": ...}` for a held-out evaluation, followed by the recorder's tags (`irl/round`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pipeline.metrics import read_metrics
from pipeline.types import EvalRow, LoopEvent, Restart, StepRow


class Recorder:
    """Records one loop of `stage` in `run_dir`. `offset` and `tags` place the loop inside a longer stage: irl
    round k's steps are numbered from offset = (k - 1) * irl.rl_steps and its rows carry {"irl/round": k}.
    `events()` and `summary()` read metrics.jsonl, so they cover the rows a resumed stage wrote before."""

    def __init__(
        self,
        run_dir: Path,
        *,
        stage: str,
        total_steps: int,
        offset: int = 0,
        tags: dict[str, Any] | None = None,
        out: TextIO = sys.stdout,
    ):
        self.run_dir, self.stage, self.total_steps = run_dir, stage, total_steps
        self.offset, self.tags = offset, dict(tags or {})
        self.out = out
        self.restarts = 0  # the loop's restarts from a checkpoint, as its last Restart counted them
        self.finished = False  # the evaluation after the last step was recorded
        self._tb: _TensorBoard | None = None
        self._started = time.monotonic()
        self._first_step: int | None = None

    def add(self, event: LoopEvent) -> None:
        if isinstance(event, Restart):  # the loop starts again from the checkpoint of event.step
            self.restarts = event.count
            self.truncate(event.step)
            return
        final = isinstance(event, EvalRow) and event.final
        self.finished = self.finished or final
        row = {"step": self.offset + event.step, **({"final": True} if final else {}), **event.metrics, **self.tags}
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"stage": self.stage, **row}) + "\n")
        if self._tb is None:
            self._tb = _TensorBoard(self.run_dir / "tb")
        self._tb.add_scalars_flat(row["step"], row)
        self.out.write(self.progress_line(event) + "\n")
        self.out.flush()

    def truncate(self, after_step: int) -> None:
        """Drop this loop's rows that a resume from the checkpoint of `after_step` (0 or -1: none) yields again."""
        truncate(self.run_dir, stage=self.stage, after_step=after_step, offset=self.offset, tags=self.tags)

    def events(self) -> list[StepRow | EvalRow]:
        return read_events(self.run_dir, self.stage, offset=self.offset, tags=self.tags)

    def summary(self) -> dict[str, Any]:
        return rl_summary(self.events(), restarts=self.restarts)

    def progress_line(self, event: StepRow | EvalRow) -> str:
        step = self.offset + event.step
        parts = [f"[{self.stage}] step {step}/{self.total_steps}"]
        match event:
            case EvalRow(metrics=metrics):
                parts.append("eval")
                parts += [f"{k.removeprefix('eval/')} {v:+.4f}" for k, v in metrics.items() if k != "eval/prompts"]
            case StepRow(metrics=metrics):
                if self._first_step is None:  # the ETA counts from the first step this process ran
                    self._first_step = step - 1
                    self._started = time.monotonic() - float(metrics.get("timing/step", 0.0))
                done = step - self._first_step
                eta = (time.monotonic() - self._started) / max(done, 1) * (self.total_steps - step)
                parts.append(f"eta {eta:4.0f}s")
                for key, label in (("reward/mean", "reward"), ("gold_reward/mean", "gold"), ("kl/ref", "kl")):
                    if key in metrics:
                        parts.append(f"{label} {metrics[key]:+.4f}")
                if "samples_per_s" in metrics:
                    parts.append(f"{metrics['samples_per_s']:.0f} samples/s")
        return "  ".join(parts)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_events(
    run_dir: Path, stage: str, *, offset: int = 0, tags: dict[str, Any] | None = None
) -> list[StepRow | EvalRow]:
    """The rows of `stage` in metrics.jsonl that carry `tags`, as the events the loop yielded: steps numbered less
    `offset`, the tags left out."""
    tags = tags or {}
    return [_event(row, offset, tags) for row in read_metrics(run_dir, stage) if _tagged(row, tags)]


def _tagged(row: dict[str, Any], tags: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in tags.items())


def _event(row: dict[str, Any], offset: int, tags: dict[str, Any]) -> StepRow | EvalRow:
    metrics = {k: v for k, v in row.items() if k not in ("stage", "step", "final") and k not in tags}
    if "eval/prompts" in row:  # every evaluation counts its prompts; no step row has an eval/ key
        return EvalRow(row["step"] - offset, metrics, final=bool(row.get("final")))
    return StepRow(row["step"] - offset, metrics)


def truncate(
    run_dir: Path, *, stage: str, after_step: int, offset: int = 0, tags: dict[str, Any] | None = None
) -> None:
    """Drop the rows of `stage` that a loop resumed from the checkpoint of `after_step` (0 or -1: none) yields again:
    its steps after `after_step`, and its evaluations with the weights of `after_step` or later (the one before
    step 1 when there is no checkpoint; the final one always). Rows without `tags` (an earlier irl round, another
    stage) stay."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    tags = tags or {}

    def comes_again(row: dict[str, Any]) -> bool:
        if row.get("stage") != stage or not _tagged(row, tags):
            return False
        event = _event(row, offset, tags)
        return event.step >= after_step if isinstance(event, EvalRow) else event.step > after_step

    keep = [row for row in read_metrics(run_dir) if not comes_again(row)]
    path.write_text("".join(json.dumps(row) + "\n" for row in keep))


def rl_summary(events: list[StepRow | EvalRow], *, restarts: int) -> dict[str, Any]:
    """summary.json entries of an RL loop (DESIGN.md) from its recorded steps and evaluations.

    Throughput is over the steps' own time (`timing/step`), `timing/<stage>` summed over the steps. The gold reward
    is the held-out evaluations' when they have one (initial: before step 1; final: after the last step, once the
    loop finished), else that of the first and last steps' samples. `faults/learner_restarts`: the loop's restarts
    from a checkpoint (`restarts`); `faults/restarts`: the most worker restarts Ray made, as the steps counted."""
    steps = [e for e in events if isinstance(e, StepRow)]
    evals = [e for e in events if isinstance(e, EvalRow)]
    out: dict[str, Any] = {}
    if steps:
        first, last = steps[0].metrics, steps[-1].metrics
        busy = sum(s.metrics.get("timing/step", 0.0) for s in steps)
        samples = sum(s.metrics.get("samples", 0) for s in steps)
        tokens = sum(s.metrics.get("tokens", 0) for s in steps)
        out.update(
            {
                "steps": steps[-1].step,
                "samples_per_s": samples / busy if busy else 0.0,
                "tokens_per_s": tokens / busy if busy else 0.0,
                "reward/initial": first.get("reward/mean"),
                "reward/final": last.get("reward/mean"),
                "kl/final": last.get("kl/ref"),
                "mismatch/logprob_abs_max": max(s.metrics.get("mismatch/logprob_abs_max", 0.0) for s in steps),
            }
        )
        if "gold_reward/mean" in first:
            out["gold_reward/initial"] = first["gold_reward/mean"]
            out["gold_reward/final"] = last["gold_reward/mean"]
        for key in sorted({k for s in steps for k in s.metrics if k.startswith("timing/") and k != "timing/step"}):
            out[key] = sum(s.metrics.get(key, 0.0) for s in steps)
        out["faults/restarts"] = max(s.metrics.get("faults/restarts", 0.0) for s in steps)
    if evals and "eval/gold_reward" in evals[0].metrics:
        out["gold_reward/initial"] = evals[0].metrics["eval/gold_reward"]
        final = [e for e in evals if e.final]
        if final:
            out["gold_reward/final"] = final[-1].metrics["eval/gold_reward"]
    out["faults/learner_restarts"] = restarts
    return out


class _TensorBoard:
    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def add_scalars_flat(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

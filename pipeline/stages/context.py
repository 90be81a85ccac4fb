"""What stages share: the run's config and dir, and the artifacts earlier stages produced.

Artifacts are persisted to `<run_dir>/artifacts.json` after every stage, so a resumed run skips finished stages
and finds their outputs. Resolution rules (one place): an explicit config path wins over an earlier stage's
output; data files default to the synthetic task's files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError

ARTIFACTS = "artifacts.json"


@dataclass
class Artifacts:
    task_dir: str | None = None  # the synthetic task (synth stage)
    gold_reward: str | None = None  # "module:function" of the task's hidden reward, when it has one
    policy: str | None = None  # the current policy (HF dir): each training stage replaces it
    initial_policy: str | None = None  # the policy before the last policy-training stage (its reference)
    reward: list[str] = field(default_factory=list)  # reward model dirs (K > 1: an ensemble)
    done: list[str] = field(default_factory=list)  # stages finished, in order

    def save(self, run_dir: Path) -> None:
        (run_dir / ARTIFACTS).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Artifacts:
        path = run_dir / ARTIFACTS
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


@dataclass
class StageContext:
    cfg: Config
    run_dir: Path
    artifacts: Artifacts
    log: Callable[[str], None] = print
    stop: Callable[[], int | None] = lambda: None  # the signal number once SIGINT/SIGTERM asked the run to stop

    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def data_file(self, kind: str) -> Path:
        """`data.<kind>` if set, else the synthetic task's file; a clear error names the key otherwise."""
        explicit = getattr(self.cfg.data, kind)
        if explicit is not None:
            return Path(explicit)
        if self.artifacts.task_dir is not None:
            return Path(self.artifacts.task_dir) / f"{kind}.parquet"
        raise ConfigError(f"data.{kind} is not set and no `synth` stage ran before; give data.{kind}=FILE")

    def policy_dir(self) -> Path:
        if self.cfg.model.policy is not None and self.artifacts.policy is None:
            return Path(self.cfg.model.policy)
        if self.artifacts.policy is not None:
            return Path(self.artifacts.policy)
        raise ConfigError("model.policy is not set and no earlier stage made a policy; give model.policy=DIR")

    def tokenizer_dir(self) -> Path:
        return Path(self.cfg.model.tokenizer) if self.cfg.model.tokenizer is not None else self.policy_dir()

    def reward_dirs(self) -> list[Path]:
        if self.cfg.model.reward is not None and not self.artifacts.reward:
            return [Path(self.cfg.model.reward)]
        return [Path(p) for p in self.artifacts.reward]

    def gold_reward(self) -> str | None:
        return self.artifacts.gold_reward

    def record(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.artifacts, key, value)
        self.artifacts.save(self.run_dir)

"""The `sweep` section of the config schema: Ray Tune's search space over config keys and its trial settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.sections import Section


class SearchSpace(Section):
    grid: list[Any] | None = Field(None, description="Try every value.")
    choice: list[Any] | None = Field(None, description="Sample uniformly from these values.")
    loguniform: tuple[float, float] | None = Field(None, description="Sample log-uniformly in [low, high].")

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchSpace:
        given = [k for k in ("grid", "choice", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform (got {given or 'none'})")
        if self.loguniform is not None and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError(f"loguniform needs 0 < low < high (got {list(self.loguniform)})")
        if [] in (self.grid, self.choice):
            raise ValueError("grid and choice need at least one value")
        return self


class SweepConfig(Section):
    """`raylign sweep`: Ray Tune trials over config keys. The stages before `rl` run once, shared by the trials;
    each trial runs the `rl` stage with its values of the swept keys."""

    space: dict[str, SearchSpace] = Field(default_factory=dict, description="Dotted config key -> search space.")
    num_samples: int = Field(1, ge=1, description="Samples of the space (each grid point is tried this often).")
    max_concurrent: int = Field(1, ge=1, description="Trials running at once.")
    metric: Literal["gold_reward/final", "reward/final", "kl/final"] = Field(
        "gold_reward/final",
        description="Metric that picks the best trial and that ASHA compares; reported every RL step (the value "
        "so far: the step's sample mean, and the held-out evaluation at the end for gold_reward/final).",
    )
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or lower metric is better.")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="`asha` stops weak trials early.")
    grace_period: int = Field(1, ge=1, description="ASHA: RL steps every trial runs before it may be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: 1 / share of the trials kept at each rung.")

"""The root of the config schema, `Config`, and its cross-field checks."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.config.sections import (
    DEFAULT_STAGES,
    AlgoConfig,
    CheckpointConfig,
    DataConfig,
    LearnerConfig,
    LoraConfig,
    ModelConfig,
    PlacementConfig,
    ReferenceConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    Section,
    Stage,
    SynthConfig,
)
from pipeline.config.stages import DpoConfig, EvalConfig, IrlConfig, RewardTrainConfig, SftConfig
from pipeline.config.sweep import SweepConfig


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    stages: list[Stage] = Field(default_factory=lambda: list(DEFAULT_STAGES), min_length=1)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    rm: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    irl: IrlConfig = Field(default_factory=IrlConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def lora_for(self, key: str) -> LoraConfig | None:
        """The LoRA settings of one training (`lora.stages` names: sft, rm, dpo, irl, rl), None where it trains in
        full."""
        return self.lora if self.lora.rank > 0 and key in self.lora.stages else None

    @property
    def base_reference(self) -> bool:
        """LoRA RL without reference.model: the RL reference is the policy learners' base model, adapters off."""
        return self.lora_for("rl") is not None and self.reference.model is None

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        for key, msg in _cross_field_problems(self):
            raise ValueError(f"{key}: {msg}")
        return self


def _cross_field_problems(cfg: Config) -> list[tuple[str, str]]:
    problems = []
    if cfg.algo.name in ("grpo", "rloo") and cfg.rollout.samples_per_prompt < 2:
        problems.append(
            (
                "rollout.samples_per_prompt",
                f"= {cfg.rollout.samples_per_prompt}, but algo.name={cfg.algo.name} "
                "compares samples within a group and needs at least 2",
            )
        )
    if cfg.algo.kl.controller == "adaptive" and cfg.algo.kl.target is None:
        problems.append(("algo.kl.target", "is required when algo.kl.controller=adaptive"))
    chunks, rest = divmod(cfg.rollout.prompts_per_step, cfg.rollout.chunk_size)
    if {"rl", "irl"} & set(cfg.stages) and (rest or chunks % cfg.learner.num_workers):
        problems.append(
            (
                "rollout.chunk_size",
                f"= {cfg.rollout.chunk_size}: rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) must be a "
                f"multiple of it, in a number of chunks divisible by learner.num_workers ({cfg.learner.num_workers}): "
                "every learner rank takes the same number of equal chunks per step",
            )
        )
    if cfg.lora.rank and cfg.learner.zero_stage == 3 and cfg.learner.backend == "deepspeed":
        problems.append(
            (
                "lora.rank",
                f"= {cfg.lora.rank} with learner.zero_stage=3: LoRA trains with ZeRO 0-2 (the adapters are small; "
                "stage 3 would shard the frozen base too, which the merged export and weight sync do not gather)",
            )
        )
    if len(set(cfg.stages)) != len(cfg.stages):
        problems.append(("stages", f"= {cfg.stages} lists a stage twice"))
    return problems

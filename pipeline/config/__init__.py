"""The one config schema of a raylign run, and the one place where YAML and `a.b=value` overrides are merged.

Every default lives here and nowhere else (STYLE.md rule 2): call sites read `cfg.section.key`, never
`dict.get("key", default)`. Models are frozen and reject unknown keys, so a typo is an error, not a no-op.

The schema is split by concept: `sections` (run, data, model and the RL roles), `stages` (the offline stage
sections), `sweep` (Ray Tune's search space), `root` (`Config` and its cross-field checks), `loading` (YAML,
overrides, validation, error lines).
Import every name from `pipeline.config`.
"""

from pipeline.config.loading import (
    describe_validation_error,
    dotted_key,
    load_config,
    merge_overrides,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    to_yaml,
    validate,
)
from pipeline.config.root import Config
from pipeline.config.sections import (
    DEFAULT_STAGES,
    AlgoConfig,
    CheckpointConfig,
    DataConfig,
    KLConfig,
    LearnerConfig,
    LoraConfig,
    ModelConfig,
    PlacementConfig,
    ReferenceConfig,
    RewardConfig,
    RewardSource,
    RolloutConfig,
    RunConfig,
    Section,
    Stage,
    SynthConfig,
)
from pipeline.config.stages import (
    DpoConfig,
    EvalConfig,
    IrlConfig,
    RewardTrainConfig,
    SftConfig,
    offline_batch_size,
    offline_epochs,
    offline_lr,
    offline_max_failures,
    offline_max_tokens,
)
from pipeline.config.sweep import SearchSpace, SweepConfig

__all__ = [
    "AlgoConfig",
    "CheckpointConfig",
    "Config",
    "DEFAULT_STAGES",
    "DataConfig",
    "DpoConfig",
    "EvalConfig",
    "IrlConfig",
    "KLConfig",
    "LearnerConfig",
    "LoraConfig",
    "ModelConfig",
    "PlacementConfig",
    "ReferenceConfig",
    "RewardConfig",
    "RewardSource",
    "RewardTrainConfig",
    "RolloutConfig",
    "RunConfig",
    "SearchSpace",
    "Section",
    "SftConfig",
    "Stage",
    "SweepConfig",
    "SynthConfig",
    "describe_validation_error",
    "dotted_key",
    "load_config",
    "merge_overrides",
    "offline_batch_size",
    "offline_epochs",
    "offline_lr",
    "offline_max_failures",
    "offline_max_tokens",
    "parse_override",
    "read_yaml_mapping",
    "set_dotted",
    "to_yaml",
    "validate",
]

"""The run, data, model and RL sections of the config schema (pipeline.config re-exports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Stage = Literal["synth", "sft", "reward", "dpo", "irl", "rl", "eval"]
DEFAULT_STAGES: tuple[Stage, ...] = ("synth", "sft", "reward", "rl")
RewardSource = Literal["model", "function", "url"]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunConfig(Section):
    name: str = Field("raylign", min_length=1, description="Run name; the run dir is <output_dir>/<name>-<timestamp>.")
    output_dir: Path = Field(Path("runs"), description="Parent directory of run directories.")
    seed: int = Field(0, description="Seed for data order, sampling and model init.")
    max_steps: int = Field(20, ge=1, description="RL steps (policy updates) in the `rl` stage.")
    checkpoint_every: int = Field(10, ge=1, description="Write a checkpoint every this many RL steps.")
    max_bad_steps: int = Field(3, ge=1, description="Stop after this many non-finite updates in a row.")
    max_restarts: int = Field(
        3,
        ge=0,
        description="Restarts of each rollout, reward and reference actor after a crash (its calls in "
        "flight are retried, a restarted rollout worker loads the current weights).",
    )
    max_failures: int = Field(
        0,
        ge=0,
        description="RL: times the run restarts the learners (and all roles) from the last checkpoint after "
        "a learner dies; 0 stops the run with a message (resume it with `raylign run --resume`).",
    )
    eval_prompts: int = Field(
        64, ge=1, description="Held-out (test split) prompts sampled before and after RL to measure the gold reward."
    )


class SynthConfig(Section):
    num_prompts: int = Field(512, ge=8, description="Prompts written by `synth` (train + test).")
    demos_per_prompt: int = Field(2, ge=1, description="High-gold demonstrations per prompt.")
    pairs_per_prompt: int = Field(
        32,
        ge=1,
        description="Preference pairs per prompt. The tiny reward model needs many: with 4 it reached 0.72 x the "
        "Bayes-optimal held-out accuracy, with 32 over 0.9 x (README).",
    )
    test_fraction: float = Field(0.125, gt=0, lt=1, description="Share of prompts held out as the test split.")
    label_temperature: float = Field(
        0.1,
        gt=0,
        description="Bradley-Terry temperature of the simulated raters: higher means noisier labels.",
    )
    policy_hidden_size: int = Field(128, ge=16, description="Hidden size of the tiny Llama policy.")
    policy_layers: int = Field(4, ge=1, description="Decoder layers of the tiny Llama policy.")
    reward_hidden_size: int = Field(128, ge=16, description="Hidden size of the tiny Llama reward model.")
    reward_layers: int = Field(2, ge=1, description="Decoder layers of the tiny Llama reward model.")
    vocab_size: int = Field(1024, ge=300, description="Byte-level BPE vocabulary size (256 bytes + merges).")


class DataConfig(Section):
    prompts: Path | None = Field(None, description="Prompts file (Parquet or JSONL): column `prompt` or `messages`.")
    preferences: Path | None = Field(None, description="Preferences file: columns `prompt`, `chosen`, `rejected`.")
    demos: Path | None = Field(None, description="Demonstrations file: columns `prompt`, `response`.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="`error`: stop with exit 2 on the first bad file; `skip`: drop, count and report.",
    )
    max_prompt_tokens: int = Field(64, ge=1, description="Longest prompt allowed, in tokens.")
    max_response_tokens: int = Field(64, ge=1, description="Longest response (demo, chosen, rejected), in tokens.")


class ModelConfig(Section):
    policy: Path | None = Field(None, description="Initial policy (HF dir); None: the `synth` stage's policy.")
    reward: Path | None = Field(None, description="Reward model (HF dir); None: trained or synthesized in the run.")
    tokenizer: Path | None = Field(None, description="Tokenizer dir; None: the policy's.")


class RolloutConfig(Section):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    engine: Literal["vllm", "hf"] = Field("vllm", description="Generation backend: vLLM, or transformers generate.")
    num_workers: int = Field(1, ge=1, description="Rollout actors (one engine each).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per RL step (P).")
    samples_per_prompt: int = Field(4, ge=1, description="Responses sampled per prompt (G).")
    async_: bool = Field(
        False,
        alias="async",
        description="Generate the next steps' samples while the learners train (off-policy by up to max_staleness "
        "updates; pair it with algo.tis_cap). Default: on-policy, each step samples with the newest weights.",
    )
    max_staleness: int = Field(1, ge=1, description="Async mode: how many steps generation may run ahead.")
    chunk_size: int = Field(
        8,
        ge=1,
        description="Prompts per experience chunk: generation, scoring and reference logprobs run chunk by chunk "
        "as a pipeline, so the stages overlap within a step.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Longest generated response, in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="vLLM KV-cache share of GPU memory (GPU only; CPU uses kv_cache_memory_bytes)."
    )
    kv_cache_memory_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="vLLM KV-cache size on CPU, in bytes (a RAM share such as vLLM's default 0.92 fails on CPU).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per vLLM engine (tensor parallel inside the actor's placement bundle); 1 on CPU."
    )
    max_logprob_mismatch: float = Field(
        1e-2,
        gt=0,
        description="Largest |learner - rollout| logprob of a sampled token (mismatch/logprob_abs_max) allowed in an "
        "on-policy step; above it the weights the engines sample with are not the learner's. fp32 on CPU stays "
        "far below; bf16 on GPU needs more (docs/models.md).",
    )
    on_mismatch: Literal["warn", "error"] = Field(
        "warn",
        description="Above max_logprob_mismatch: warn in one line, or stop the run (exit 1) before the step "
        "is checkpointed.",
    )


class RewardConfig(Section):
    function: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description='Reward function "module:function", called as f(prompts, responses) -> list[float].',
    )
    url: str | None = Field(
        None, pattern=r"^https?://\S+$", description="Remote HTTP reward: POST {prompts, responses} -> {rewards}."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one remote reward request.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed remote reward request, with backoff.")
    backoff_s: float = Field(
        0.5, ge=0, description="Wait before the first retry of a remote reward request; doubles on each retry."
    )
    weights: dict[RewardSource, float] = Field(
        default_factory=dict,
        description="Weight of each reward source (model, function, url) in the summed reward; "
        "a configured source not listed weighs 1.0.",
    )
    ensemble_size: int = Field(1, ge=1, description="Reward models trained in the `reward` stage (K).")
    uncertainty_penalty: float = Field(0.0, ge=0, description="RL reward = ensemble mean - this * ensemble std.")
    micro_batch_size: int = Field(32, ge=1, description="Sequences per reward-model forward pass.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget of one reward-model scoring forward pass, in place of micro_batch_size: sequences "
        "go longest first into the first micro-batch with room (counted as packed, or padded when packing is off); "
        "None: micro_batch_size sequences each.",
    )
    packing: bool = Field(
        True,
        description="Padding-free reward-model scoring and training (rm, irl): a micro-batch's sequences concatenated "
        "into a few rows of at most 256 tokens, positions restarting per sequence, the score head read at each one's "
        "scored token. Falls back to padded rows, with one log line, when the model fails the check at load (packed "
        "and padded scores of a probe batch must agree).",
    )
    num_workers: int = Field(1, ge=1, description="Reward-scoring actors.")

    DEFAULT_WEIGHT: ClassVar[float] = 1.0  # weight of a configured source that `weights` does not list

    @field_validator("weights")
    @classmethod
    def _weights_are_finite_and_configured(cls, weights: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        for source, w in weights.items():
            if not abs(w) < float("inf"):
                raise ValueError(f"weight of {source!r} is {w}; weights must be finite")
        # `model` is not checked here: the reward model dirs come from the stages, not from this section.
        for source in ("function", "url"):
            if source in weights and info.data.get(source) is None:
                raise ValueError(f"gives a weight for {source!r}, but reward.{source} is not set")
        return weights

    def weight(self, source: RewardSource) -> float:
        """Weight of one configured source ("model", "function" or "url") in the summed reward."""
        return self.weights.get(source, self.DEFAULT_WEIGHT)


class ReferenceConfig(Section):
    model: Path | None = Field(None, description="Reference model (HF dir); None: the initial policy.")
    micro_batch_size: int = Field(32, ge=1, description="Sequences per reference forward pass.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget of one reference forward pass, in place of micro_batch_size: sequences go longest "
        "first into the first micro-batch with room (counted as packed, or padded when packing is off); None: "
        "micro_batch_size sequences each.",
    )
    packing: bool = Field(
        True,
        description="Padding-free reference forwards: a micro-batch's sequences concatenated in one row, positions "
        "restarting per sequence. Falls back to padded rows, with one log line, when the model fails the check at "
        "setup (packed and padded logprobs of a probe batch must agree).",
    )
    num_workers: int = Field(1, ge=1, description="Reference-logprob actors.")
    cpu_threads: int = Field(
        0,
        ge=0,
        description="torch threads of each reference actor on CPU; 0: the resource plan splits the machine's cores "
        "among the reference actors, and the rollout workers too when they generate while it scores (several chunks "
        "a step, or async mode).",
    )


class LearnerConfig(Section):
    num_workers: int = Field(1, ge=1, description="Policy learner actors (data-parallel ranks).")
    backend: Literal["deepspeed", "torch"] = Field(
        "deepspeed", description="Training engine: DeepSpeed ZeRO, or plain torch (fallback and fast tests)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO stage. Unset or null: 0 with one learner rank (nothing to partition, and ZeRO-2 "
        "on one rank takes the same updates more slowly), 2 with several ranks or with offload.",
    )
    lr: float = Field(1e-4, gt=0, description="Learning rate (AdamW).")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear LR warmup, then constant LR.")
    lr_decay_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps in all (warmup included) over which the LR falls linearly after warmup, to "
        "lr / (steps - warmup) at the last; None: constant LR. The offline stages set it from <stage>.lr_schedule.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward on one learner.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="RL policy learner and critic: token budget of one forward/backward, in place of "
        "micro_batch_size: sequences go longest first into the first micro-batch with room (counted as packed, or "
        "padded when packing is off); loss weights stay over the whole step. None: micro_batch_size sequences each.",
    )
    packing: bool = Field(
        True,
        description="RL policy learner and critic, and the sft, rm, dpo and irl training: padding-free forwards, a "
        "micro-batch's sequences packed into one row (reward models: a few rows) with positions restarting per "
        "sequence. Falls back to padded rows, with one log line, when the model fails the check at setup (packed "
        "and padded outputs of a probe batch must agree).",
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    epochs: int = Field(1, ge=1, description="Passes over one step's experience (RL: an update each) or over the data.")
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer state (and params under ZeRO-3).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    cpu_threads: int = Field(
        0,
        ge=0,
        description="torch threads of each learner process on CPU (RL learners, critic, sft/reward/dpo workers); "
        "0: the resource plan splits the machine's cores among the processes training at once (num_workers; x2 for "
        "PPO's critic; + the rollout workers in async mode). Ray alone would give an actor one thread per logical "
        "CPU it holds.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_zero_stage(cls, data: Any) -> Any:
        """One rank: ZeRO-0, whose update equals ZeRO-2's without its per-micro-batch epilogue and fp32 master copy;
        several ranks (or offload, which needs a partitioned optimizer): ZeRO-2."""
        if isinstance(data, dict) and data.get("zero_stage") is None:
            several = data.get("num_workers", 1) != 1 or data.get("offload", False)
            data = {**data, "zero_stage": 2 if several else 0}
        return data

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> LearnerConfig:
        if self.offload and (self.backend != "deepspeed" or self.zero_stage == 0):
            raise ValueError(
                f"learner.offload=true needs backend=deepspeed and zero_stage >= 1 "
                f"(got backend={self.backend}, zero_stage={self.zero_stage})"
            )
        return self


class LoraConfig(Section):
    rank: int = Field(
        0,
        ge=0,
        description="LoRA rank r; 0: off (full-parameter training). With r > 0 the RL policy learners and the sft, "
        "rm, dpo and irl stages train peft LoRA adapters only (a reward model's score head trains whole), and the RL "
        "reference is the learners' base model with the adapters off (unless reference.model is set).",
    )
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: adapter updates are scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None,
        description="Names of the layers that get adapters (e.g. [q_proj, v_proj]); None: every attention and MLP "
        "projection of the architecture (its Linear / Conv1D layers, output heads left out).",
    )

    stages: list[Literal["sft", "rm", "dpo", "irl", "rl"]] = Field(
        ["sft", "rm", "dpo", "irl", "rl"],
        description="Where adapters train: sft, rm (the reward stage), dpo, irl (its reward training) and rl (the "
        "RL policy learners, also in irl's rounds); the others train in full. LoRA needs a trained base: a "
        "random-init policy learns its SFT in full.",
    )

    @field_validator("target_modules")
    @classmethod
    def _named(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not name for name in v)):
            raise ValueError("give at least one non-empty layer name, or null for the architecture's projections")
        return v


class KLConfig(Section):
    coef: float = Field(0.05, ge=0, description="KL coefficient (initial value for the adaptive controller).")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="KL estimator (Schulman 2020).")
    mode: Literal["reward", "loss"] = Field("reward", description="KL as a per-token reward penalty or a loss term.")
    controller: Literal["fixed", "adaptive"] = Field("fixed", description="Fixed coefficient or Ziegler et al. 2019.")
    target: float | None = Field(None, gt=0, description="Target KL of the adaptive controller.")
    horizon: int = Field(10000, ge=1, description="Horizon of the adaptive controller, in samples.")


class AlgoConfig(Section):
    name: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = Field("grpo", description="Policy-gradient algorithm.")
    kl: KLConfig = Field(default_factory=KLConfig)
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO ratio clip below 1.")
    clip_high: float = Field(0.2, ge=0, description="PPO ratio clip above 1.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo).")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = Field(
        "token-mean", description="How per-token losses reduce to a scalar, over a whole step's batch."
    )
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip PPO bound c on negative advantages; None: off.")
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance-sampling cap on learner/rollout ratios; None: off."
    )
    value_clip: float | None = Field(0.2, gt=0, description="PPO critic value clip around old values; None: off.")


class CheckpointConfig(Section):
    keep: int = Field(2, ge=1, description="Complete checkpoints kept in the run dir.")


Role = Literal["rollout", "reward", "reference", "learner", "critic"]


class PlacementConfig(Section):
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Plan for CPUs or GPUs; auto: GPU when the Ray cluster has one."
    )
    resources: dict[Role, dict[str, float]] = Field(
        default_factory=dict,
        description="Extra (custom) Ray resources each actor of a role needs, e.g. {rollout: {inference_node: 1}} to "
        "put rollout engines on nodes started with that resource.",
    )
    colocate: list[list[Role]] = Field(
        default_factory=list,
        description="Groups of roles that share bundles: actor i of each role in a group goes into bundle i and "
        "takes an equal share of its CPU/GPU, e.g. [[reward, reference]].",
    )
    timeout_s: float = Field(120.0, gt=0, description="How long to wait for the cluster to place a role's actors.")

    @model_validator(mode="after")
    def _roles_once(self) -> PlacementConfig:
        roles = [r for group in self.colocate for r in group]
        if len(set(roles)) != len(roles):
            raise ValueError(f"colocate: a role appears in two groups: {self.colocate}")
        if any(len(group) < 2 for group in self.colocate):
            raise ValueError(f"colocate: each group needs at least 2 roles: {self.colocate}")
        return self

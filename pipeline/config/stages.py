"""The offline stage sections of the config schema (sft, rm, dpo, irl, eval), with the fields they share."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.sections import Section

# The fields every offline training section (sft, rm, dpo, irl) has, each defined once: its constraint, its
# description and the default the stages share. Field factories rather than a base section: the learning rate and
# epochs keep a default per stage, and each section keeps its own key order (a base class's fields come first).


def offline_lr(default: float, *, of: str) -> Any:
    """`lr` of an offline stage: it takes the place of learner.lr in the stage's engine."""
    return Field(default, gt=0, description=f"Learning rate (AdamW) of {of}.")


def offline_lr_schedule() -> Any:
    """`lr_schedule` of an offline stage: it sets learner.lr_decay_steps in the stage's engine."""
    return Field(
        "constant",
        description="`constant`: the LR after learner.warmup_steps stays `lr`; `linear`: it falls linearly over the "
        "stage's updates (epochs x updates per epoch) to lr / updates at the last.",
    )


def offline_epochs(default: int, *, over: str) -> Any:
    """`epochs` of an offline stage: it takes the place of learner.epochs in the stage's engine."""
    return Field(default, ge=1, description=f"Passes over {over}.")


def offline_batch_size(*, rows: str) -> Any:
    """`batch_size` of an offline stage: the global batch, split evenly over learner.num_workers."""
    return Field(32, ge=1, description=f"{rows} per optimizer update, over all workers together.")


def offline_max_tokens() -> Any:
    """`max_tokens_per_micro_batch` of an offline stage: it takes the place of learner.max_tokens_per_micro_batch in
    the stage's engine (learner.packing chooses the layout whose tokens it counts)."""
    return Field(
        None,
        ge=1,
        description="Token budget of one forward/backward, in place of learner.micro_batch_size: rows go longest "
        "first into the first micro-batch with room (a pair's two rows together; counted as packed, or padded when "
        "learner.packing is off); loss weights stay over the whole update. None: learner.micro_batch_size rows each.",
    )


def offline_packing() -> Any:
    """`packing` of an offline stage: the stage's own choice of layout, else learner.packing's."""
    return Field(
        None,
        description="Padding-free (packed) forwards in this stage's training; null: as learner.packing. A packed "
        "update equals the padded one up to float rounding, so a stage may keep the padded numbers it was tuned on.",
    )


def offline_max_failures() -> Any:
    return Field(
        1, ge=-1, description="Ray Train worker failures to recover from (last epoch checkpoint); -1: unlimited."
    )


class SftConfig(Section):
    """The `sft` stage: next-token loss on the demonstrations' response tokens, on Ray Train. The optimizer and
    engine settings not listed here (betas, warmup, ZeRO stage, micro-batch, workers) come from `learner`."""

    lr: float = offline_lr(1e-3, of="supervised fine-tuning")
    lr_schedule: Literal["constant", "linear"] = offline_lr_schedule()
    epochs: int = offline_epochs(4, over="the training demonstrations")
    batch_size: int = offline_batch_size(rows="Demonstrations")
    max_tokens_per_micro_batch: int | None = offline_max_tokens()
    packing: bool | None = offline_packing()
    max_failures: int = offline_max_failures()
    eval_samples: int = Field(4, ge=1, description="Responses sampled per held-out prompt for sft/gold_reward.")


class RewardTrainConfig(Section):
    """The `reward` stage: Bradley-Terry reward models from preferences, on Ray Train (`reward.ensemble_size`
    members). Engine settings not listed here come from `learner`."""

    init: Literal["task", "policy"] = Field(
        "task",
        description="Start each member from `task`: the synthetic task's reward model when the run has one (else the "
        "policy), or from `policy`: the current policy (e.g. the SFT model, as in InstructGPT) with a new head.",
    )
    lr: float = offline_lr(3e-4, of="reward-model training")
    lr_schedule: Literal["constant", "linear"] = offline_lr_schedule()
    epochs: int = offline_epochs(2, over="the training preference pairs, per ensemble member")
    batch_size: int = offline_batch_size(rows="Preference pairs")
    max_tokens_per_micro_batch: int | None = offline_max_tokens()
    packing: bool | None = offline_packing()
    bootstrap: bool = Field(
        False, description="Train each ensemble member on a bootstrap resample (Poisson(1) copies of each pair)."
    )
    pairs: Literal["data", "policy", "both"] = Field(
        "data",
        description="`data`: the preferences file's train split; `policy`: pairs of the current policy's own samples "
        "on the training prompts, labelled by the synthetic task's simulated raters (needs a `synth` stage; as "
        "InstructGPT's labellers rated its SFT model's samples); `both`: the two together.",
    )
    policy_pairs_per_prompt: int = Field(8, ge=1, description="pairs=policy/both: sample pairs labelled per prompt.")
    demonstration_pairs: bool = Field(
        False,
        description="Also train on (demonstration, policy sample) pairs, the demonstration preferred: one per "
        "row of data.demos' train split, the sample drawn from the policy before the stage (the irl stage's first "
        "round as extra preferences), so one reward model learns from preferences and demonstrations together.",
    )
    max_failures: int = offline_max_failures()


class DpoConfig(Section):
    """The `dpo` stage: DPO / IPO / cDPO against the policy before the stage, on Ray Train. Engine settings not
    listed here come from `learner`."""

    beta: float = Field(0.1, gt=0, description="KL strength beta (the IPO paper's tau for loss_type=ipo).")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="`sigmoid`: DPO (Rafailov et al. 2023); `ipo`: IPO (Azar et al. 2023)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="cDPO: assumed share of flipped preference labels (sigmoid loss only)."
    )
    lr: float = offline_lr(1e-5, of="DPO")
    lr_schedule: Literal["constant", "linear"] = offline_lr_schedule()
    epochs: int = offline_epochs(1, over="the training preference pairs")
    batch_size: int = offline_batch_size(rows="Preference pairs")
    max_tokens_per_micro_batch: int | None = offline_max_tokens()
    packing: bool | None = offline_packing()
    max_failures: int = offline_max_failures()
    eval_samples: int = Field(4, ge=1, description="Sample pairs per held-out prompt for dpo/gold_win_rate.")
    pairs: Literal["data", "policy"] = Field(
        "data",
        description="`data`: the preferences file; `policy`: pairs of the reference policy's own samples on the "
        "training prompts, labelled by the synthetic task's simulated raters (needs a `synth` stage).",
    )
    policy_pairs_per_prompt: int = Field(4, ge=1, description="pairs=policy: sample pairs labelled per prompt.")

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> DpoConfig:
        if self.label_smoothing != 0 and self.loss_type != "sigmoid":
            raise ValueError(
                f"dpo.label_smoothing = {self.label_smoothing} is only defined for loss_type=sigmoid "
                f"(got loss_type={self.loss_type})"
            )
        return self


class EvalConfig(Section):
    """The `eval` stage: the policy against the reference on held-out prompts, best-of-N from the reference, and
    reward-model calibration on held-out preference pairs. Sampling uses `rollout` (engine, workers, chunks,
    max_new_tokens) at temperature 1 and top_p 1, so the sampled-token logprobs give an unbiased KL estimate."""

    num_prompts: int = Field(64, ge=1, description="Held-out prompts (test split, in file order) to sample.")
    samples_per_prompt: int = Field(
        8, ge=1, description="Responses per prompt from the policy and from the reference for win rates, rewards, KL."
    )
    best_of_n: int = Field(
        64,
        ge=1,
        description="Largest N of the best-of-N curve (N = 1, 2, 4, ..., this; a power of 2): this many reference "
        "samples are drawn and scored per prompt.",
    )
    bootstrap_resamples: int = Field(1000, ge=100, description="Bootstrap resamples (of prompts) per interval.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the bootstrap confidence intervals.")
    calibration_bins: int = Field(10, ge=2, description="Bins of predicted probability in the reliability plot.")
    gold_reward: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description='Gold reward "module:function" to judge samples by; None: the synthetic task\'s, when the run '
        "has one.",
    )

    @field_validator("best_of_n")
    @classmethod
    def _power_of_two(cls, n: int) -> int:
        if n & (n - 1):
            raise ValueError(f"must be a power of 2 (1, 2, 4, ..., 64), got {n}")
        return n


class IrlConfig(Section):
    """The `irl` stage: reward learning from demonstrations only. Each round samples the current policy on the
    demonstrations' prompts, trains the reward model as a discriminator (demonstrations above policy samples) on
    Ray Train, then runs `rl_steps` RL steps against it. Engine settings not listed here come from `learner`."""

    method: Literal["adversarial", "afd"] = Field(
        "adversarial",
        description="`adversarial`: each round samples the current policy and refits the discriminator (GAIL / AIRL); "
        "`afd`: one reward model from the demonstrations against the initial policy's samples (round 1), then the "
        "RL steps of every round against it (Sun & van der Schaar 2024, alignment from demonstrations).",
    )
    rounds: int = Field(3, ge=1, description="Rounds of (sample, discriminator update, RL steps).")
    rl_steps: int = Field(10, ge=1, description="RL steps (policy updates) per round.")
    init: Literal["task", "policy"] = Field(
        "policy",
        description="Start the discriminator from `policy`: the policy before the stage with a new one-label head, "
        "or `task`: the synthetic task's random-init reward model.",
    )
    discriminator: Literal["continue", "fresh"] = Field(
        "continue",
        description="Rounds after the first: `continue` trains the last round's discriminator further; `fresh` "
        "trains a new one from `irl.init` (its epochs from scratch on the round's pairs: a weaker discriminator "
        "each round, which the RL steps cannot exploit as far).",
    )
    replay_rounds: int = Field(
        3,
        ge=0,
        description="The discriminator also sees policy samples of up to this many earlier rounds (one per "
        "demonstration, from a random earlier round, next to this round's): the policy cannot go back to an old "
        "exploit. 0: this round's samples only.",
    )
    reference: Literal["initial", "round"] = Field(
        "initial",
        description="The KL leash of each round's RL steps: `initial`, the policy before the stage; `round`, the "
        "policy the round starts from. With `round` and `algo.kl.coef` 1, a round maximizes the discriminator's "
        "logit (log p_demo / p_policy at its optimum) minus KL to its start: the reverse KL to the demonstrations.",
    )
    standardize_reward: bool = Field(
        False,
        description="Each round's RL reward is the discriminator's score divided by its std on that round's "
        "demonstrations and policy samples, so a sharper discriminator does not outweigh the KL leash.",
    )
    lr: float = offline_lr(3e-4, of="the discriminator")
    lr_schedule: Literal["constant", "linear"] = offline_lr_schedule()
    epochs: int = offline_epochs(1, over="one round's (demonstration, policy sample) pairs")
    batch_size: int = offline_batch_size(rows="(demonstration, sample) pairs")
    max_tokens_per_micro_batch: int | None = offline_max_tokens()
    packing: bool | None = offline_packing()
    max_failures: int = offline_max_failures()

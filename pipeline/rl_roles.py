"""The actors of the RL stage, placed by the resource plan, the experience stream between them
(pipeline/stream.py), and the coarse operations the loop calls on them. Every fan-out is one `ray.get`."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from actors.critic import ValueLearner
from actors.learner import LearnerGroup, PolicyLearner
from actors.reference import ReferenceWorker
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from actors.training.lora import ADAPTER_SUFFIX
from actors.training.update import mean_metrics
from actors.weight_sync import WeightBoard, broadcast_weights
from cluster.plan import plan, release, reserve, resolve_device, spawn
from pipeline import checkpoint
from pipeline.config import Config, RolloutConfig
from pipeline.errors import RunFailure
from pipeline.experience import combine_metrics
from pipeline.progress import get_with_progress, with_lines
from pipeline.stages.context import StageContext
from pipeline.stream import CHUNK_SEED_STRIDE, ExperienceStream
from pipeline.types import PromptBatch


def get_all(refs: list) -> list:
    """ray.get of every ref, raising the first failure as soon as it happens: when one learner rank dies, the
    others wait in a collective that will never finish."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def check_mismatch(step: int, metrics: dict[str, float], cfg: RolloutConfig) -> str | None:
    """The mismatch guard: in an on-policy step (every sample drawn with the weights of step - 1, the learner's
    before its update) learner and rollout logprobs of the same tokens must agree. -> a one-line warning when
    `mismatch/logprob_abs_max` is over `cfg.max_logprob_mismatch`, else None; with `cfg.on_mismatch` "error"
    it raises RunFailure instead. Stale samples (async mode) differ by design and are not checked."""
    value = metrics.get("mismatch/logprob_abs_max")
    if value is None or metrics.get("weight_version") != step - 1 or value <= cfg.max_logprob_mismatch:
        return None
    what = (
        f"rl step {step}: learner and rollout logprobs of the same tokens differ by up to {value:.3g} "
        f"(mismatch/logprob_abs_max), over rollout.max_logprob_mismatch={cfg.max_logprob_mismatch:g}: the "
        "engines sampled with weights that are not the learner's (weight sync), so the step is off-policy"
    )
    if cfg.on_mismatch == "error":
        raise RunFailure(
            f"{what}; rollout.on_mismatch=error stops the run before step {step} is checkpointed "
            "(`raylign run --resume RUN_DIR` continues from the last complete checkpoint)"
        )
    return f"warning: {what} (rollout.on_mismatch=error stops the run instead)"


@dataclass(frozen=True)
class TrainedStep:
    """What the learners' update of one step gives the loop."""

    metrics: dict[str, float]  # policy (and `critic/*`) train metrics, experience metrics, `faults/restarts`
    intervals: list[tuple[str, float, float]]  # (stage, start, end) wall clock of the step's chunks in the stream
    ready: float  # wall-clock time the last learner rank had its chunks


class Roles:
    def __init__(self, cfg: Config, ctx: StageContext):
        self.cfg = cfg
        self.log = ctx.log
        self.gold_reward = ctx.gold_reward()
        self.policy_dir = ctx.policy_dir()
        self.resource_plan = plan(cfg, device=resolve_device(cfg), reference_actors=not cfg.base_reference)
        ctx.log(self.resource_plan.describe())
        self.groups = reserve(self.resource_plan, timeout_s=cfg.placement.timeout_s)
        roles, policy = self.resource_plan.roles, self.policy_dir
        reference = Path(cfg.reference.model) if cfg.reference.model is not None else policy
        # Crashed rollout, reward and reference actors are restarted by Ray (their calls in flight retried); they
        # sign in with the board, and a restarted rollout worker takes the current weights from it.
        self.board = ray.remote(num_cpus=0)(WeightBoard).remote()
        restarts = cfg.run.max_restarts
        # LoRA: vLLM engines serve the base weights plus the adapter each sync sends; the HF engine takes merged
        # weights.
        self.lora = cfg.lora_for("rl")
        self.adapter_sync = self.lora is not None and cfg.rollout.engine == "vllm"
        if self.lora is not None and not self.adapter_sync:
            ctx.log("rl: lora: rollout.engine=hf cannot serve adapters; weight sync sends the merged weights")
        self.rollouts = spawn(
            RolloutWorker,
            roles["rollout"],
            self.groups,
            [(cfg.rollout, policy)] * roles["rollout"].count,
            {"seed": cfg.run.seed, "board": self.board, "lora_rank": cfg.lora.rank if self.adapter_sync else 0},
            restarts=restarts,
        )
        self.rewards = spawn(
            RewardWorker,
            roles["reward"],
            self.groups,
            [(cfg.reward, ctx.reward_dirs())] * roles["reward"].count,
            {"board": self.board},
            restarts=restarts,
        )
        self.references = []
        if not cfg.base_reference:
            self.references = spawn(
                ReferenceWorker,
                roles["reference"],
                self.groups,
                [(roles["reference"].settings(cfg.reference), reference)] * roles["reference"].count,
                {"board": self.board},
                restarts=restarts,
            )
        self.learners = self._learner_group(PolicyLearner, "learner")
        if cfg.base_reference:
            ctx.log(
                "rl: reference: the policy learners' base model with the LoRA adapters off (no separate reference "
                "model in memory; reference.model names one)"
            )
        self.critic = self._learner_group(ValueLearner, "critic") if "critic" in roles else None
        self.stream: ExperienceStream | None = None
        self.chunks = 0  # chunks of the step fed last
        self.workers = len(self.rollouts) + len(self.rewards) + len(self.references)
        self.restarts_before = 0  # worker restarts counted by the attempts before this one (train_iter sets it)

    def _learner_group(self, cls: type, role: str) -> LearnerGroup:
        rp = self.resource_plan.roles[role]
        return LearnerGroup(
            cls,
            rp.settings(self.cfg.learner),
            self.cfg.algo,
            self.policy_dir,
            seed=self.cfg.run.seed,
            placement_group=self.groups[rp.group],
            **rp.actor_resources(0),
            lora=self.lora if cls is PolicyLearner else None,  # PPO's critic trains in full
        )

    @classmethod
    def start(cls, cfg: Config, ctx: StageContext) -> Roles:
        start = time.perf_counter()
        roles = cls(cfg, ctx)
        actors = roles.rollouts + roles.rewards + roles.references
        pending = [a.setup.remote() for a in actors]
        groups = [(g, name) for g, name in ((roles.learners, "learners"), (roles.critic, "critic")) if g is not None]
        count = len(actors) + sum(len(g.actors) for g, _ in groups)
        ctx.log(f"rl: starting {count} actors (engines, models, learners)")
        for group, name in groups:
            with_lines(group.setup, ctx.log, f"rl: starting the {name}")
        get_with_progress(pending, ctx.log, "rl: starting the rollout, reward and reference actors:", "ready")
        roles.open_stream()
        ctx.log(f"rl: actors ready ({time.perf_counter() - start:.0f}s)")
        return roles

    def open_stream(self) -> None:
        """Build the experience stream and hand each policy learner rank its split."""
        critics = self.critic.actors if self.critic is not None else []
        self.stream = ExperienceStream(
            rollouts=self.rollouts,
            rewards=self.rewards,
            references=self.learners.actors if self.cfg.base_reference else self.references,
            critics=critics,
            algo=self.cfg.algo,
            gold_reward=self.gold_reward,
            num_splits=len(self.learners.actors),
        )
        self.learners.attach_stream(self.stream.splits)

    def feed(self, step: int, prompts: list[str], *, seed: int, kl_coef: float) -> None:
        """Queue a step's prompts into the stream: from here they sample, score and take reference logprobs."""
        r = self.cfg.rollout
        if self.stream is None:
            raise RuntimeError("Roles.feed before Roles.open_stream")
        self.chunks = self.stream.put(
            step, prompts, samples_per_prompt=r.samples_per_prompt, chunk_size=r.chunk_size, seed=seed, kl_coef=kl_coef
        )

    def train(self, step: int) -> TrainedStep:
        """Every policy learner rank takes its share of `step`'s chunks from the stream; the policy ranks and (PPO)
        the critic ranks then update on those batches at the same time, rank r of each on rank r's batch."""
        batches, shard_refs = self.learners.take_step(step, self.chunks // len(self.learners.actors))
        policy = self.learners.train_async(batches)
        critic = self.critic.train_async(batches) if self.critic is not None else []
        results = get_all(policy + critic)
        shards = ray.get(shard_refs)  # done: each train_step waited for its rank's batch
        metrics = mean_metrics(results[: len(policy)])
        if critic:
            metrics.update({f"critic/{k}": v for k, v in mean_metrics(results[len(policy) :]).items()})
        metrics.update(combine_metrics([m for s in shards for m in s.experience]))
        metrics["faults/restarts"] = float(self.restarts_before + self.restarts())
        if warning := check_mismatch(step, metrics, self.cfg.rollout):
            self.log(warning)
        return TrainedStep(metrics, [t for s in shards for t in s.intervals], max(s.ready for s in shards))

    def restarts(self) -> int:
        """Rollout, reward and reference actors Ray restarted in this attempt (counted when they set up again)."""
        return ray.get(self.board.sign_ins.remote()) - self.workers

    def sync(self, version: int) -> int:
        """The learners' weights of `version` to every rollout engine: the adapter alone when the engines serve
        LoRA adapters, else the full (with LoRA: merged) weights. -> the bytes sent."""
        adapter, tensors = (
            self.learners.gather_adapter() if self.adapter_sync else (None, self.learners.gather_weights())
        )
        broadcast_weights(tensors, version, self.rollouts, board=self.board, adapter=adapter)
        return sum(t.numel() * t.element_size() for _, t in tensors)

    def evaluate(self, prompts: list[str], *, seed: int) -> dict[str, float]:
        """Sample the held-out prompts (G each, seeded) with the current policy; reward and gold reward means."""
        g, size = self.cfg.rollout.samples_per_prompt, self.cfg.rollout.chunk_size
        gens = [
            self.rollouts[c % len(self.rollouts)].generate.remote(
                PromptBatch(prompts[start : start + size], g, seed=seed + CHUNK_SEED_STRIDE * c)
            )
            for c, start in enumerate(range(0, len(prompts), size))
        ]
        scores = ray.get([self.rewards[c % len(self.rewards)].score.remote(gen) for c, gen in enumerate(gens)])
        out = {"eval/reward": torch.cat([s.scores for s in scores]).mean().item(), "eval/prompts": float(len(prompts))}
        if self.gold_reward is not None:
            from actors.reward import import_reward_function

            gold_fn = import_reward_function(self.gold_reward)
            gold = [x for r in ray.get(gens) for x in gold_fn(r.prompts, r.responses)]
            out["eval/gold_reward"] = sum(gold) / len(gold)
        return out

    def save_checkpoint(self, root: Path, state: dict[str, Any], *, keep: int) -> Path:
        def write(d: Path) -> None:
            self.learners.save_checkpoint(d / "learner")
            if self.critic is not None:
                self.critic.save_checkpoint(d / "critic")

        return checkpoint.save(root, state["step"], state, write, keep=keep)

    def load_checkpoint(self, path: Path, *, version: int) -> None:
        self.learners.load_checkpoint(path / "learner")
        if self.critic is not None:
            self.critic.load_checkpoint(path / "critic")
        self.sync(version)

    def save_policy(self, out_dir: Path) -> None:
        """The policy as an HF dir; with LoRA merged, and its adapter beside it (<out_dir>-adapter)."""
        adapter = out_dir.with_name(out_dir.name + ADAPTER_SUFFIX) if self.lora is not None else None
        for d in (out_dir, adapter):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self.learners.save_pretrained(out_dir, adapter)

    def shutdown(self) -> None:
        if self.stream is not None:
            self.stream.close()
        for group in (self.learners, self.critic):
            if group is not None:
                group.shutdown()
        for actor in self.rollouts + self.rewards + self.references:
            ray.kill(actor)
        release(self.groups)

"""The actors of the RL stage, placed by the resource plan, and the coarse operations the loop calls on them.
Every fan-out is one `ray.get`; experience moves between actors as object refs."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from actors.critic import ValueLearner
from actors.engine import mean_metrics
from actors.learner import LearnerGroup, PolicyLearner
from actors.reference import ReferenceWorker
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from actors.weight_sync import broadcast_weights
from cluster.plan import plan, release, reserve, resolve_device, spawn
from pipeline import checkpoint
from pipeline.config import Config
from pipeline.experience import Chunk, make_train_batches
from pipeline.stages.context import StageContext
from pipeline.types import PromptBatch

CHUNK_SEED_STRIDE = 1000  # chunk c samples prompt i with seed + c * stride + i


@dataclass(frozen=True)
class ChunkRefs:
    gen: Any  # ObjectRef[Rollouts]
    reward: Any  # ObjectRef[RewardScores]
    ref: Any  # ObjectRef[Tensor [B, T]]
    values: Any = None  # ObjectRef[Tensor [B, T]] (ppo)


@ray.remote(num_cpus=0)
def _assemble(algo, kl_coef, world_size, gold_reward, n_chunks, *parts):
    """Ray task: chunk results -> (shard_0, ..., shard_{W-1}, metrics)."""
    per = len(parts) // n_chunks
    chunks = [
        Chunk(rollouts=parts[i * per], scores=parts[i * per + 1].scores, ref_logprobs=parts[i * per + 2],
              values=parts[i * per + 3] if per == 4 else None)
        for i in range(n_chunks)
    ]
    shards, metrics = make_train_batches(chunks, algo, kl_coef=kl_coef, world_size=world_size, gold_reward=gold_reward)
    return (*shards, metrics)


class Roles:
    def __init__(self, cfg: Config, ctx: StageContext):
        self.cfg = cfg
        self.gold_reward = ctx.gold_reward()
        self.policy_dir = ctx.policy_dir()
        self.resource_plan = plan(cfg, device=resolve_device(cfg))
        ctx.log(self.resource_plan.describe())
        self.groups = reserve(self.resource_plan, timeout_s=cfg.placement.timeout_s)
        roles, policy = self.resource_plan.roles, self.policy_dir
        reference = Path(cfg.reference.model) if cfg.reference.model is not None else policy
        seed = cfg.run.seed
        self.rollouts = spawn(RolloutWorker, roles["rollout"], self.groups,
                              [(cfg.rollout, policy)] * roles["rollout"].count, {"seed": seed})
        self.rewards = spawn(RewardWorker, roles["reward"], self.groups,
                             [(cfg.reward, ctx.reward_dirs())] * roles["reward"].count)
        self.references = spawn(ReferenceWorker, roles["reference"], self.groups,
                                [(cfg.reference, reference)] * roles["reference"].count)
        self.learners = self._learner_group(PolicyLearner, "learner")
        self.critic = self._learner_group(ValueLearner, "critic") if "critic" in roles else None

    def _learner_group(self, cls: type, role: str) -> LearnerGroup:
        rp = self.resource_plan.roles[role]
        return LearnerGroup(cls, self.cfg.learner, self.cfg.algo, self.policy_dir, seed=self.cfg.run.seed,
                            placement_group=self.groups[rp.group], **rp.actor_resources(0))

    @classmethod
    def start(cls, cfg: Config, ctx: StageContext) -> Roles:
        roles = cls(cfg, ctx)
        actors = roles.rollouts + roles.rewards + roles.references
        pending = [a.setup.remote() for a in actors]
        groups = [g for g in (roles.learners, roles.critic) if g is not None]
        for group in groups:
            group.setup()
        ray.get(pending)
        return roles

    def experience(self, prompts: list[str], *, seed: int) -> list[ChunkRefs]:
        """Launch generate -> score -> reference (-> values) for every chunk of prompts; -> refs per chunk."""
        g, size = self.cfg.rollout.samples_per_prompt, self.cfg.rollout.chunk_size
        out = []
        for c, start in enumerate(range(0, len(prompts), size)):
            batch = PromptBatch(prompts[start : start + size], g, seed=seed + CHUNK_SEED_STRIDE * c)
            gen = self.rollouts[c % len(self.rollouts)].generate.remote(batch)
            reward = self.rewards[c % len(self.rewards)].score.remote(gen)
            ref = self.references[c % len(self.references)].logprobs.remote(gen)
            values = None
            if self.critic is not None:  # every critic rank joins the forward (ZeRO-3 gathers are collective)
                values = [a.compute_values.remote(gen) for a in self.critic.actors][0]
            out.append(ChunkRefs(gen, reward, ref, values))
        return out

    def assemble(self, chunks: list[ChunkRefs], *, kl_coef: float) -> tuple[list, Any]:
        """-> (one TrainBatch ref per learner rank, ref of the step's experience metrics)."""
        world = len(self.learners.actors)
        parts = [r for c in chunks for r in (c.gen, c.reward, c.ref, c.values) if r is not None]
        refs = _assemble.options(num_returns=world + 1).remote(
            self.cfg.algo, kl_coef, world, self.gold_reward, len(chunks), *parts
        )
        return list(refs[:world]), refs[world]

    def train(self, shards: list) -> dict[str, float]:
        policy = [a.train_step.remote(s) for a, s in zip(self.learners.actors, shards, strict=True)]
        critic = []
        if self.critic is not None:
            critic = [a.train_step.remote(s) for a, s in zip(self.critic.actors, shards, strict=True)]
        results = ray.get(policy + critic)
        metrics = mean_metrics(results[: len(policy)])
        if critic:
            metrics.update({f"critic/{k}": v for k, v in mean_metrics(results[len(policy) :]).items()})
        return metrics

    def sync(self, version: int) -> float:
        return broadcast_weights(self.learners.gather_weights(), version, self.rollouts)

    def evaluate(self, prompts: list[str], *, seed: int) -> dict[str, float]:
        """Sample the held-out prompts (G each, seeded) with the current policy; reward and gold reward means."""
        chunks = self.experience(prompts, seed=seed)
        rollouts = ray.get([c.gen for c in chunks])
        scores = torch.cat([s.scores for s in ray.get([c.reward for c in chunks])])
        out = {"eval/reward": scores.mean().item(), "eval/prompts": float(len(prompts))}
        if self.gold_reward is not None:
            from actors.reward import import_reward_function

            gold_fn = import_reward_function(self.gold_reward)
            gold = [x for r in rollouts for x in gold_fn(r.prompts, r.responses)]
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
        shutil.rmtree(out_dir, ignore_errors=True)
        self.learners.save_pretrained(out_dir)

    def shutdown(self) -> None:
        for group in (self.learners, self.critic):
            if group is not None:
                group.shutdown()
        for actor in self.rollouts + self.rewards + self.references:
            ray.kill(actor)
        release(self.groups)

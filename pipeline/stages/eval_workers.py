"""The eval stage's engines: rollout workers for the policy and the reference, a reward and a reference worker,
placed by the resource plan, and the samples they give (pipeline/stages/eval.py, step 1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from actors.reference import ReferenceWorker
from actors.reward import RewardWorker, configured_sources, gold_scores
from actors.rollout import RolloutWorker
from cluster.plan import ResourcePlan, plan, release, reserve, resolve_device, spawn
from pipeline.algo import masked_kl
from pipeline.config import Config
from pipeline.progress import get_with_progress
from pipeline.stages.context import StageContext
from pipeline.stream import CHUNK_SEED_STRIDE
from pipeline.types import PromptBatch, Rollouts

Tensor = torch.Tensor
REFERENCE_SEED_OFFSET = 500_000  # the reference's samples are drawn independently of the policy's


@dataclass(frozen=True)
class Samples:
    """What one model's samples scored, per prompt: [P, G] each (None where the run has no such score)."""

    reward: Tensor | None
    gold: Tensor | None
    length: Tensor  # response tokens, EOS included
    kl: Tensor | None = None  # sequence KL(pi || ref) estimate: sum of log pi - log ref over the sampled tokens


class EvalWorkers:
    """Rollout engines for the policy and for the reference, a reward worker and a reference worker, placed by the
    resource plan with `rollout.num_workers` engines per model. A context manager: actors and bundles are freed."""

    def __init__(self, cfg: Config, ctx: StageContext, policy: Path, reference: Path):
        ev = cfg.eval
        self.cfg, self.log = cfg, ctx.log
        self.g, self.m = ev.samples_per_prompt, max(ev.samples_per_prompt, ev.best_of_n)
        self.resource_plan = eval_plan(cfg, resolve_device(cfg))
        self.reward_dirs = ctx.reward_dirs()
        self.has_reward = bool(configured_sources(cfg.reward, self.reward_dirs))
        # Temperature 1 and top_p 1: the sampled-token logprobs are then the sampled distribution's.
        self.rollout_cfg = cfg.rollout.model_copy(update={"temperature": 1.0, "top_p": 1.0})
        self.policy, self.reference = policy, reference

    def __enter__(self) -> EvalWorkers:
        roles, n = self.resource_plan.roles, self.cfg.rollout.num_workers
        self.groups = reserve(self.resource_plan, timeout_s=self.cfg.placement.timeout_s)
        engines = spawn(
            RolloutWorker,
            roles["rollout"],
            self.groups,
            [(self.rollout_cfg, self.policy)] * n + [(self.rollout_cfg, self.reference)] * n,
            {"seed": self.cfg.run.seed},
        )
        self.policy_engines, self.reference_engines = engines[:n], engines[n:]
        self.rewards = []
        if self.has_reward:
            self.rewards = spawn(
                RewardWorker,
                roles["reward"],
                self.groups,
                [(self.cfg.reward, self.reward_dirs)] * roles["reward"].count,
            )
        self.references = spawn(
            ReferenceWorker,
            roles["reference"],
            self.groups,
            [(roles["reference"].settings(self.cfg.reference), self.reference)] * roles["reference"].count,
        )
        self.actors = engines + self.rewards + self.references
        ray.get([a.setup.remote() for a in self.actors])
        return self

    def __exit__(self, *exc) -> None:
        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        if hasattr(self, "groups"):
            release(self.groups)

    def sample(self, prompts: list[str], gold: str | None) -> tuple[Samples, Samples]:
        """Launch every chunk's generate -> score (-> reference logprobs) as chained actor calls, then collect."""
        size, seed = self.cfg.rollout.chunk_size, self.cfg.run.seed
        policy, reference = [], []
        for c, first in enumerate(range(0, len(prompts), size)):
            chunk, s = prompts[first : first + size], seed + CHUNK_SEED_STRIDE * c
            pol = self._pick(self.policy_engines, c).generate.remote(PromptBatch(chunk, self.g, s))
            ref = self._pick(self.reference_engines, c).generate.remote(
                PromptBatch(chunk, self.m, s + REFERENCE_SEED_OFFSET)
            )
            policy.append((pol, self._score(pol, c), self._pick(self.references, c).logprobs.remote(pol)))
            reference.append((ref, self._score(ref, c), None))
        get_with_progress([c[0] for c in policy + reference], self.log, "eval: sampling policy and reference", "chunks")
        return self._collect(policy, len(prompts), gold), self._collect(reference, len(prompts), gold)

    @staticmethod
    def _pick(actors: list, c: int):
        return actors[c % len(actors)]

    def _score(self, rollouts_ref, c: int):
        return self._pick(self.rewards, c).score.remote(rollouts_ref) if self.rewards else None

    def _collect(self, chunks: list[tuple], num_prompts: int, gold: str | None) -> Samples:
        rollouts: list[Rollouts] = ray.get([c[0] for c in chunks])
        shape = (num_prompts, rollouts[0].group_size)
        reward = torch.cat([s.scores for s in ray.get([c[1] for c in chunks])]) if self.rewards else None
        gold_values = None
        if gold is not None:
            gold_values = torch.tensor(
                [x for r in rollouts for x in gold_scores(gold, r.prompts, r.responses)], dtype=torch.float64
            )
        kl = None
        if chunks[0][2] is not None:
            ref_logprobs = ray.get([c[2] for c in chunks])
            kl = torch.cat(
                [
                    masked_kl(r.rollout_logprobs, lp, r.response_mask, kind="k1").sum(-1)
                    for r, lp in zip(rollouts, ref_logprobs, strict=True)
                ]
            )
        length = torch.cat([r.response_mask.sum(-1) for r in rollouts]).double()

        def shaped(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.reshape(shape)

        return Samples(reward=shaped(reward), gold=shaped(gold_values), length=length.reshape(shape), kl=shaped(kl))


def eval_plan(cfg: Config, device: str) -> ResourcePlan:
    """The plan's rollout, reward and reference roles, with twice `rollout.num_workers` engines (policy and
    reference); no learners."""
    engines = cfg.rollout.model_copy(update={"num_workers": 2 * cfg.rollout.num_workers})
    full = plan(cfg.model_copy(update={"rollout": engines}), device=device)
    roles = {r: full.roles[r] for r in ("rollout", "reward", "reference")}
    return ResourcePlan(full.device, roles, {rp.group: full.groups[rp.group] for rp in roles.values()})

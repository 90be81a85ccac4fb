"""The policy learner: one data-parallel rank of PPO-style policy updates on a DeepSpeed (or plain torch) engine.

A plain class, made a Ray actor only at spawn time (`LearnerGroup`). `setup()` joins the torch.distributed group
(gloo on CPU, NCCL on GPU), loads the HF policy and builds the engine. One `train_step` is `epochs` optimizer
updates over this rank's shard, each accumulated over micro-batches. Loss weights are taken over the whole step
(all micro-batches of all ranks), so the update equals the single-process update on the full batch whatever the
micro-batch size or token budget, rank count, sequence lengths or forward layout (packed or padded:
actors/sequences.py).
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.sequences import LAYOUTS, Layout, balanced_shards, choose_layout, lengths_of, token_metrics
from actors.training.engine import Dist, TrainEngine, adapter_update, save_hf, start_engine
from actors.training.lora import adapter_config, add_adapters, is_lora
from actors.training.update import accumulate_update, collective_forwards, mean_metrics, micro_batch_plan
from pipeline.algo import kl_loss, masked_mean, ppo_policy_loss, truncated_is_weights
from pipeline.batches import Batch, concat_batches, take, to_device
from pipeline.config import AlgoConfig, LearnerConfig, LoraConfig
from pipeline.types import ExperienceItem, Rollouts, StepShard, TrainBatch

Tensor = torch.Tensor


class PolicyLearner:
    """One data-parallel rank of the policy. Methods take and return CPU tensors."""

    def __init__(
        self,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgoConfig,
        model_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        seed: int = 0,
        lora: LoraConfig | None = None,
    ):
        self.cfg, self.algo, self.model_dir, self.seed = learner_cfg, algo_cfg, Path(model_dir), seed
        self.dist = Dist(rank, world_size, master_addr, master_port)
        self.lora = lora if lora is not None and lora.rank > 0 else None
        self._engine: TrainEngine | None = None
        self.layout: Layout = LAYOUTS["padded"]
        # With LoRA the actor also serves reference logprobs (`logprobs`, adapters off) to the experience stream
        # while another of its calls waits on that stream (`take_step`): one model, used by one call at a time.
        self._model_lock = threading.Lock()

    @property
    def engine(self) -> TrainEngine:
        if self._engine is None:
            raise RuntimeError("call setup() first: the engine is built there")
        return self._engine

    def setup(self) -> float:
        """Join the process group, load the policy, build the engine, choose the forward layout (packed unless
        learner.packing is off or the model fails the packing check). -> seconds taken."""
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()

        def load():
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            return add_adapters(model, self.lora) if self.lora is not None else model

        self._engine = start_engine(self.cfg, self.dist, self.seed, load)
        self.layout = choose_layout(
            self.engine.model,
            self.engine.module,
            self.engine.device,
            self.cfg.packing,
            who="learner",
            quiet=self.dist.rank > 0,
        )
        return time.perf_counter() - start

    def compute_logprobs(self, batch: Batch) -> Tensor:
        """Per-token logprobs of the responses under the current weights: [B, T] float32, no grad.

        batch: anything with prompt_ids, prompt_mask, response_ids, response_mask (TrainBatch, Rollouts)."""
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
        sync = collective_forwards(self.cfg, self.dist.world_size)
        with self._model_lock, torch.no_grad():
            for idx in self._plan(batch, sync=sync):
                out[idx] = self._logprobs(to_device(take(batch, idx), self.engine.device)).cpu()
        return out

    def logprobs(self, rollouts: Rollouts) -> Tensor:
        """The reference role of a LoRA run: per-token logprobs of the responses under the base model (adapters
        off, so the initial policy): [B, T] float32. Same call as ReferenceWorker.logprobs; ZeRO 0-2 only, where a
        rank's forward needs no other rank."""
        if not is_lora(self.engine.module):
            raise RuntimeError("reference logprobs from a learner need lora.rank > 0 (the base model is the reference)")
        out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)
        with self._model_lock, torch.no_grad(), self.engine.module.disable_adapter():
            for idx in self._plan(rollouts, sync=False):
                out[idx] = self._logprobs(to_device(take(rollouts, idx), self.engine.device)).cpu()
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """`epochs` clipped-surrogate updates on this rank's TrainBatch shard. -> metrics averaged over
        micro-batches, plus `mismatch/*` (learner vs rollout logprobs before the first update) and `tokens/*`
        (this rank's real tokens and the tokens its forward passes computed: counts, summed over ranks)."""
        with self._model_lock:
            return self._train_step(batch)

    def _train_step(self, batch: TrainBatch) -> dict[str, float]:
        start, lr = time.perf_counter(), self.engine.lr
        batch = to_device(batch, self.engine.device)
        plan = self._plan(batch, sync=True)  # the same micro-batches in every epoch
        first_logprobs: list[Tensor] = []  # pre-update logprobs per micro-batch (first epoch)
        metrics: list[dict[str, float]] = []
        for _ in range(self.cfg.epochs):
            m = accumulate_update(
                self.engine,
                batch,
                plan=plan,
                agg=self.algo.loss_agg,
                world_size=self.dist.world_size,
                loss_fn=lambda i, mb: self._loss(i, mb, first_logprobs),
            )
            if any(k.startswith("bad/") for k in m):  # not finite: no update (on every rank), the loop counts it
                return {**m, "bad/skipped": 1.0, "policy/lr": lr, "timing/learner_step": time.perf_counter() - start}
            m["policy/grad_norm"] = m.pop("grad_norm")
            metrics.append(m)
        out = mean_metrics(metrics)
        if batch.rollout_logprobs is not None:
            logprobs = torch.zeros_like(batch.rollout_logprobs)
            for idx, lp in zip(plan, first_logprobs, strict=True):
                logprobs[idx.to(logprobs.device)] = lp
            out.update(self._mismatch(logprobs, batch.rollout_logprobs, batch.response_mask))
        lengths = lengths_of(batch.prompt_mask, batch.response_mask)
        out.update(token_metrics(lengths, plan, self.layout, passes=self.cfg.epochs))
        out["policy/lr"] = lr  # of the first update
        out["timing/learner_step"] = time.perf_counter() - start
        return out

    def attach_stream(self, split: Any) -> None:
        """Take this rank's split of the experience stream (a Ray Data DataIterator; pipeline/stream.py)."""
        self._stream = iter(split.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"))

    def take_step(self, step: int, n_chunks: int) -> tuple[TrainBatch, StepShard]:
        """This rank's `n_chunks` chunks of `step` from its split, joined. -> (the TrainBatch the policy and, for
        PPO, this rank's critic train on; what the chunks carried besides it). Called with `num_returns=2`, so the
        driver can hand the batch's ref to both learners without fetching it."""
        items: list[ExperienceItem] = []
        while len(items) < n_chunks:
            block = next(self._stream)
            items += [pickle.loads(p) for p in block.column("payload").to_pylist()]
        if any(it.step != step for it in items):
            raise RuntimeError(
                f"experience stream out of step: rank {self.dist.rank} expected step {step}, got "
                f"chunks of steps {sorted({it.step for it in items})}"
            )
        if any(it.train is None or it.metrics is None for it in items):
            raise RuntimeError(f"step {step}: a chunk reached learner rank {self.dist.rank} without its experience")
        metrics = [it.metrics for it in items if it.metrics is not None]
        shard = StepShard(step, metrics, [t for it in items for t in it.times], time.time())
        return concat_batches([it.train for it in items if it.train is not None]), shard

    def _loss(self, i: int, mb: TrainBatch, first_logprobs: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        logprobs = self._logprobs(mb)
        if len(first_logprobs) == i:
            first_logprobs.append(logprobs.detach())
        is_weights = None
        if self.algo.tis_cap is not None and mb.rollout_logprobs is not None:
            # Yao et al. 2025: weight by the pre-update learner/rollout ratio, truncated at the cap.
            is_weights = truncated_is_weights(
                first_logprobs[i], mb.rollout_logprobs, mb.response_mask, cap=self.algo.tis_cap
            )
        loss, metrics = ppo_policy_loss(
            logprobs,
            mb.old_logprobs,
            mb.advantages,
            mb.response_mask,
            clip_low=self.algo.clip_low,
            clip_high=self.algo.clip_high,
            dual_clip=self.algo.dual_clip,
            agg=self.algo.loss_agg,
            is_weights=is_weights,
        )
        # The batch carries the step's coefficient when a KL controller adapts it.
        coef = self.algo.kl.coef if mb.kl_coef is None else mb.kl_coef
        if self.algo.kl.mode == "loss" and coef > 0:
            if mb.ref_logprobs is None:
                raise ValueError("algo.kl.mode=loss needs ref_logprobs in the TrainBatch")
            kl = kl_loss(
                logprobs, mb.ref_logprobs, mb.response_mask, kind=self.algo.kl.estimator, agg=self.algo.loss_agg
            )
            loss = loss + coef * kl
            metrics["loss/kl"] = kl.item()
        metrics["loss/total"] = loss.item()
        return loss, metrics

    @staticmethod
    def _mismatch(logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
        diff = torch.where(mask, (logprobs - rollout_logprobs).abs(), 0.0)
        return {
            "mismatch/logprob_abs_max": diff.max().item(),
            "mismatch/logprob_abs_mean": masked_mean(diff, mask).item(),
        }

    def _logprobs(self, mb) -> Tensor:
        return self.layout.logprobs(self.engine.model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)

    def _plan(self, batch: Batch, *, sync: bool) -> list[Tensor]:
        return micro_batch_plan(batch, self.cfg, self.layout, self.dist.world_size, self.engine.device, sync=sync)

    def gather_weights(self) -> list[tuple[str, Tensor]]:
        """Full weights with HF names, on CPU, on rank 0; other ranks take part in the ZeRO-3 gather and
        return []. Every rank must call it."""
        return self.engine.full_weights(keep=self.dist.rank == 0)

    def gather_adapter(self) -> tuple[dict, list[tuple[str, Tensor]]]:
        """LoRA: (the adapter's peft config, its tensors) on rank 0, the data-parallel ranks hold the same; ({}, [])
        elsewhere. What weight sync sends to engines that serve adapters."""
        if self.dist.rank != 0:
            return {}, []
        return adapter_config(self.engine.module), adapter_update(self.engine)

    def save_pretrained(self, out_dir: str | Path, adapter_dir: str | Path | None = None) -> None:
        """Rank 0 writes an HF model dir with the tokenizer (merged, with LoRA; the adapter alone to `adapter_dir`).
        Every rank must call it, for ZeRO-3."""
        adapter = Path(adapter_dir) if adapter_dir is not None else None
        save_hf(self.engine, self.dist.rank, self.model_dir, Path(out_dir), adapter)

    def save_checkpoint(self, ckpt_dir: str | Path) -> None:
        """Engine checkpoint (weights, optimizer, LR schedule, step); every rank writes its part."""
        self.engine.save_checkpoint(Path(ckpt_dir))

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        self.engine.load_checkpoint(Path(ckpt_dir))

    def optimizer_steps(self) -> int:
        """Optimizer updates taken so far."""
        return self.engine.steps


class LearnerGroup:
    """N learner ranks as Ray actors in one process group: spawn, set up, fan out shards, gather weights.

    learner_cls: PolicyLearner or ValueLearner. placement_group: bundles first_bundle..first_bundle+N-1 hold the
    ranks (from the cluster plan); without one, rank 0 is pinned to the node whose free port it listens on.
    lora (rank > 0): the ranks train adapters and also serve reference logprobs (their base model) to the
    experience stream, so each actor takes two calls at a time (one waits on the stream)."""

    def __init__(
        self,
        learner_cls: type,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgoConfig,
        model_dir: str | Path,
        *,
        seed: int = 0,
        placement_group: Any = None,
        first_bundle: int = 0,
        num_cpus: float = 1,
        num_gpus: float = 0,
        lora: LoraConfig | None = None,
    ):
        from cluster.local import master_address
        from cluster.plan import RolePlan, placement, spawn

        n = learner_cfg.num_workers
        ranks = RolePlan("learner", "learner", [{"CPU": float(num_cpus), "GPU": float(num_gpus)}] * n)
        groups = {ranks.group: placement_group} if placement_group is not None else None
        # Rank 0 listens on a free port of the node the probe ran on: in its bundle, or pinned to that node. The
        # probe lives in a module without torch, so its worker process starts without importing the learner's.
        probe = ray.remote(num_cpus=0)(master_address).options(
            scheduling_strategy=placement(ranks, groups, 0, first_bundle=first_bundle)
        )
        addr, port, node_id = ray.get(probe.remote())
        common = {"world_size": n, "master_addr": addr, "master_port": port, "seed": seed}
        self.actors = spawn(
            learner_cls,
            ranks,
            groups,
            [(learner_cfg, algo_cfg, str(model_dir))] * n,
            {**common, **({"lora": lora} if lora is not None else {})},
            kwargs_per_actor=[{"rank": r} for r in range(n)],
            concurrency=2 if lora is not None and lora.rank > 0 else 1,
            first_bundle=first_bundle,
            node=node_id,
        )

    def setup(self) -> list[float]:
        """Set every rank up together (they rendezvous). -> seconds per rank."""
        return ray.get([a.setup.remote() for a in self.actors])

    def attach_stream(self, splits: list) -> None:
        """Rank r takes splits[r] of the experience stream (policy learners only)."""
        ray.get([a.attach_stream.remote(split) for a, split in zip(self.actors, splits, strict=True)])

    def take_step(self, step: int, n_chunks: int) -> tuple[list, list]:
        """Every rank takes its `n_chunks` chunks of `step` from its split. -> (refs of the ranks' TrainBatches,
        refs of their StepShards); the batches stay in the object store until a train_step takes them."""
        refs = [a.take_step.options(num_returns=2).remote(step, n_chunks) for a in self.actors]
        return [b for b, _ in refs], [s for _, s in refs]

    def train_async(self, shards: list) -> list:
        """Start `train_step` on every rank, rank r on shards[r] (a TrainBatch or a ref to one; equal sizes).
        -> a ref of each rank's metrics; `mean_metrics` of them is the group's."""
        return [a.train_step.remote(s) for a, s in zip(self.actors, shards, strict=True)]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One TrainBatch, split into equal shards with balanced tokens. -> metrics averaged over ranks (maxima
        for `*_max`, sums for `tokens/*`)."""
        return mean_metrics(ray.get(self.train_async([take(batch, idx) for idx in self._shards(batch)])))

    def compute_logprobs(self, batch) -> Tensor:
        return self._per_token(batch, [a.compute_logprobs for a in self.actors])

    def compute_values(self, batch) -> Tensor:
        return self._per_token(batch, [a.compute_values for a in self.actors])

    def _shards(self, batch) -> list[Tensor]:
        return balanced_shards(lengths_of(batch.prompt_mask, batch.response_mask).sum(dim=1), len(self.actors))

    def _per_token(self, batch, methods: list) -> Tensor:
        """[B, T] from each rank's method on its shard, put back in the batch's order."""
        shards = self._shards(batch)
        parts = ray.get([m.remote(take(batch, idx)) for m, idx in zip(methods, shards, strict=True)])
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
        for idx, part in zip(shards, parts, strict=True):
            out[idx] = part
        return out

    def gather_weights(self) -> list[tuple[str, Tensor]]:
        """Full HF-named weights from rank 0 (every rank joins the ZeRO-3 gather)."""
        return ray.get([a.gather_weights.remote() for a in self.actors])[0]

    def gather_adapter(self) -> tuple[dict, list[tuple[str, Tensor]]]:
        """LoRA: (peft config, adapter tensors) from rank 0."""
        return ray.get(self.actors[0].gather_adapter.remote())

    def save_pretrained(self, out_dir: str | Path, adapter_dir: str | Path | None = None) -> None:
        adapter = None if adapter_dir is None else str(adapter_dir)
        ray.get([a.save_pretrained.remote(str(out_dir), adapter) for a in self.actors])

    def save_checkpoint(self, ckpt_dir: str | Path) -> None:
        ray.get([a.save_checkpoint.remote(str(ckpt_dir)) for a in self.actors])

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        ray.get([a.load_checkpoint.remote(str(ckpt_dir)) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

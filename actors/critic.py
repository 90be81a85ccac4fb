"""The PPO critic: a scalar value head on the policy's causal-LM backbone, trained on the same engines as the
policy learner (actors/learner.py) and spawned by the same `LearnerGroup`.

The critic is `AutoModelForTokenClassification(num_labels=1)` loaded from the policy dir: the backbone weights
come from the policy, the head starts random (same seed on every rank). V(s_t) for response token t is read at
the position that predicts t, as the logits are, so values line up with logprobs and advantages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actors.sequences import LAYOUTS, Layout, choose_layout, lengths_of, token_metrics
from actors.training.engine import Dist, TrainEngine, save_hf, start_engine
from actors.training.update import accumulate_update, collective_forwards, mean_metrics, micro_batch_plan
from pipeline.algo import value_loss
from pipeline.batches import Batch, take, to_device
from pipeline.config import AlgoConfig, LearnerConfig
from pipeline.types import TrainBatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor


class ValueLearner:
    """One data-parallel rank of the critic. Methods take and return CPU tensors."""

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
    ):
        self.cfg, self.algo, self.model_dir, self.seed = learner_cfg, algo_cfg, Path(model_dir), seed
        self.dist = Dist(rank, world_size, master_addr, master_port)
        self._engine: TrainEngine | None = None
        self.layout: Layout = LAYOUTS["padded"]

    @property
    def engine(self) -> TrainEngine:
        if self._engine is None:
            raise RuntimeError("call setup() first: the engine is built there")
        return self._engine

    def setup(self) -> float:
        """Join the process group, load backbone + value head, build the engine, choose the forward layout
        (packed unless learner.packing is off or the model fails the packing check). -> seconds taken."""
        from transformers import AutoModelForTokenClassification

        start = time.perf_counter()

        def load() -> PreTrainedModel:
            return AutoModelForTokenClassification.from_pretrained(self.model_dir, num_labels=1, dtype=torch.float32)

        self._engine = start_engine(self.cfg, self.dist, self.seed, load)
        self.layout = choose_layout(
            self.engine.model,
            self.engine.module,
            self.engine.device,
            self.cfg.packing,
            who="critic",
            quiet=self.dist.rank > 0,
        )
        return time.perf_counter() - start

    def compute_values(self, batch: Batch) -> Tensor:
        """V(s_t) for every response token: [B, T] float32, 0 where the response mask is False; no grad."""
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
        sync = collective_forwards(self.cfg, self.dist.world_size)
        with torch.no_grad():
            for idx in self._plan(batch, sync=sync):
                out[idx] = self._values(to_device(take(batch, idx), self.engine.device)).cpu()
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """`epochs` clipped value-loss updates on this rank's TrainBatch shard (needs returns, old_values).
        -> metrics, `tokens/*` as the policy learner's."""
        if batch.returns is None or batch.old_values is None:
            raise ValueError("the critic's TrainBatch needs returns and old_values")
        start = time.perf_counter()
        batch = to_device(batch, self.engine.device)
        plan = self._plan(batch, sync=True)
        metrics: list[dict[str, float]] = []

        def loss_fn(i: int, mb: TrainBatch) -> tuple[Tensor, dict[str, float]]:
            assert mb.old_values is not None and mb.returns is not None  # checked on the whole batch above
            return value_loss(
                self._values(mb),
                mb.old_values,
                mb.returns,
                mb.response_mask,
                clip=self.algo.value_clip,
                agg=self.algo.loss_agg,
            )

        for _ in range(self.cfg.epochs):
            m = accumulate_update(
                self.engine,
                batch,
                plan=plan,
                agg=self.algo.loss_agg,
                world_size=self.dist.world_size,
                loss_fn=loss_fn,
            )
            if any(k.startswith("bad/") for k in m):  # not finite: no update (on every rank)
                return {**m, "timing/critic_step": time.perf_counter() - start}
            m["value/grad_norm"] = m.pop("grad_norm")
            metrics.append(m)
        tokens = token_metrics(
            lengths_of(batch.prompt_mask, batch.response_mask), plan, self.layout, passes=self.cfg.epochs
        )
        return {**mean_metrics(metrics), **tokens, "timing/critic_step": time.perf_counter() - start}

    def _values(self, mb: TrainBatch) -> Tensor:
        return self.layout.values(self.engine.model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)

    def _plan(self, batch: Batch, *, sync: bool) -> list[Tensor]:
        return micro_batch_plan(batch, self.cfg, self.layout, self.dist.world_size, self.engine.device, sync=sync)

    def gather_weights(self) -> list[tuple[str, Tensor]]:
        """Full weights with HF names on rank 0 ([] elsewhere); every rank must call it (ZeRO-3)."""
        return self.engine.full_weights(keep=self.dist.rank == 0)

    def save_pretrained(self, out_dir: str | Path) -> None:
        save_hf(self.engine, self.dist.rank, self.model_dir, Path(out_dir))

    def save_checkpoint(self, ckpt_dir: str | Path) -> None:
        self.engine.save_checkpoint(Path(ckpt_dir))

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        self.engine.load_checkpoint(Path(ckpt_dir))

"""The PPO critic: a scalar value head on the policy's causal-LM backbone, trained on the same engines as the
policy learner (actors/learner.py) and spawned by the same `LearnerGroup`.

The critic is `AutoModelForTokenClassification(num_labels=1)` loaded from the policy dir: the backbone weights
come from the policy, the head starts random (same seed on every rank). V(s_t) for response token t is read at
the position that predicts t, as the logits are, so values line up with logprobs and advantages.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from actors.engine import (
    Batch,
    Dist,
    TrainEngine,
    accumulate_update,
    mean_metrics,
    rows,
    save_hf,
    start_engine,
    to_device,
)
from actors.sequences import response_logits
from pipeline.algo import value_loss
from pipeline.config import AlgoConfig, LearnerConfig
from pipeline.types import TrainBatch

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
        self.engine: TrainEngine | None = None

    def setup(self) -> float:
        """Join the process group, load backbone + value head, build the engine. -> seconds taken."""
        from transformers import AutoModelForTokenClassification

        start = time.perf_counter()

        def load() -> torch.nn.Module:
            return AutoModelForTokenClassification.from_pretrained(self.model_dir, num_labels=1, dtype=torch.float32)

        # the critic trains while the policy learners do: the two groups share the cores
        self.engine = start_engine(self.cfg, self.dist, self.seed, load, groups=2)
        return time.perf_counter() - start

    def compute_values(self, batch: Batch) -> Tensor:
        """V(s_t) for every response token: [B, T] float32, 0 where the response mask is False; no grad."""
        out = []
        with torch.no_grad():
            for s in range(0, len(batch), self.cfg.micro_batch_size):
                mb = to_device(rows(batch, s, s + self.cfg.micro_batch_size), self.engine.device)
                out.append(self._values(mb).cpu())
        return torch.cat(out)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """`epochs` clipped value-loss updates on this rank's TrainBatch shard (needs returns, old_values)."""
        if batch.returns is None or batch.old_values is None:
            raise ValueError("the critic's TrainBatch needs returns and old_values")
        start = time.perf_counter()
        batch = to_device(batch, self.engine.device)
        metrics: list[dict[str, float]] = []
        for _ in range(self.cfg.epochs):
            m = accumulate_update(
                self.engine,
                batch,
                micro_batch_size=self.cfg.micro_batch_size,
                agg=self.algo.loss_agg,
                world_size=self.dist.world_size,
                loss_fn=lambda i, mb: value_loss(
                    self._values(mb),
                    mb.old_values,
                    mb.returns,
                    mb.response_mask,
                    clip=self.algo.value_clip,
                    agg=self.algo.loss_agg,
                ),
            )
            if any(k.startswith("bad/") for k in m):  # not finite: no update (on every rank)
                return {**m, "timing/critic_step": time.perf_counter() - start}
            m["value/grad_norm"] = m.pop("grad_norm")
            metrics.append(m)
        return {**mean_metrics(metrics), "timing/critic_step": time.perf_counter() - start}

    def _values(self, mb: TrainBatch) -> Tensor:
        logits = response_logits(self.engine.model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
        return torch.where(mb.response_mask, logits.squeeze(-1).float(), 0.0)

    def gather_weights(self) -> list[tuple[str, Tensor]]:
        """Full weights with HF names on rank 0 ([] elsewhere); every rank must call it (ZeRO-3)."""
        return self.engine.full_weights(keep=self.dist.rank == 0)

    def save_pretrained(self, out_dir: str | Path) -> None:
        save_hf(self.engine, self.dist.rank, self.model_dir, Path(out_dir))

    def save_checkpoint(self, ckpt_dir: str | Path) -> None:
        self.engine.save_checkpoint(Path(ckpt_dir))

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        self.engine.load_checkpoint(Path(ckpt_dir))

"""The reference role: per-token logprobs of sampled responses under the frozen reference policy (the KL anchor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoModelForCausalLM

from actors.hf import load_frozen_model, set_cpu_threads
from actors.sequences import LAYOUTS, Layout, choose_layout, lengths_of, micro_batches
from pipeline.config import ReferenceConfig
from pipeline.types import Rollouts

Tensor = torch.Tensor


class ReferenceWorker:
    """Scores rollouts under the frozen reference model. Plain class; made a Ray actor where it is spawned."""

    def __init__(self, cfg: ReferenceConfig, model_dir: Path, *, board: Any = None):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.model: torch.nn.Module | None = None
        self.board = board  # a WeightBoard actor to sign in with (restarts are counted there)
        self.layout: Layout = LAYOUTS["padded"]

    def setup(self) -> None:
        """Load the model and choose the forward layout (packed unless reference.packing is off or the model
        fails the packing check)."""
        set_cpu_threads(self.cfg.cpu_threads)
        model = load_frozen_model(AutoModelForCausalLM, self.model_dir)
        device = next(model.parameters()).device
        self.model, self.layout = model, choose_layout(model, model, device, self.cfg.packing, who="reference")
        if self.board is not None:
            ray.get(self.board.sign_in.remote())

    @torch.inference_mode()
    def logprobs(self, rollouts: Rollouts) -> Tensor:
        """Reference logprobs of each response token: [B, T] float32 on CPU, 0 where response_mask is False."""
        if self.model is None:  # also the first call after Ray restarted this actor
            self.setup()
        model = self.model
        if model is None:
            raise RuntimeError("the reference model did not load")
        device = next(model.parameters()).device
        out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)
        fields = (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, rollouts.response_mask)
        plan = micro_batches(
            lengths_of(rollouts.prompt_mask, rollouts.response_mask),
            rows=self.cfg.micro_batch_size,
            max_tokens=self.cfg.max_tokens_per_micro_batch,
            tokens=self.layout.tokens,
        )
        for idx in plan:
            out[idx] = self.layout.logprobs(model, *(t[idx].to(device) for t in fields)).cpu()
        return out

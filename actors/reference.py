"""The reference role: per-token logprobs of sampled responses under the frozen reference policy (the KL anchor).

`load_frozen_model` is also how the reward role loads its reward models: frozen models are loaded one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoModelForCausalLM

from actors.engine import set_cpu_threads
from actors.sequences import response_logprobs
from pipeline.config import ReferenceConfig
from pipeline.types import Rollouts

Tensor = torch.Tensor


def inference_placement() -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a frozen model: bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_frozen_model(auto_class: type, model_dir: Path) -> torch.nn.Module:
    """An HF model (`auto_class.from_pretrained(model_dir)`) in eval mode with gradients off, on its device."""
    device, dtype = inference_placement()
    model = auto_class.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def trim_padding(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor):
    """Drop the columns that are padding in every row (left of the prompts, right of the responses).

    Positions come from the mask (actors.sequences.join), so the logprobs do not change; a micro-batch of
    short sequences just costs less. Keeps at least one column of each, as response_logits needs."""
    first = int(prompt_mask.any(dim=0).float().argmax()) if prompt_mask.any() else prompt_mask.shape[1] - 1
    used = response_mask.any(dim=0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    return prompt_ids[:, first:], prompt_mask[:, first:], response_ids[:, :width], response_mask[:, :width]


class ReferenceWorker:
    """Scores rollouts under the frozen reference model. Plain class; made a Ray actor where it is spawned."""

    def __init__(self, cfg: ReferenceConfig, model_dir: Path, *, board: Any = None):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.model: torch.nn.Module | None = None
        self.board = board  # a WeightBoard actor to sign in with (restarts are counted there)

    def setup(self) -> None:
        set_cpu_threads(self.cfg.cpu_threads, self.cfg.num_workers)
        self.model = load_frozen_model(AutoModelForCausalLM, self.model_dir)
        if self.board is not None:
            ray.get(self.board.sign_in.remote())

    @torch.inference_mode()
    def logprobs(self, rollouts: Rollouts) -> Tensor:
        """Reference logprobs of each response token: [B, T] float32 on CPU, 0 where response_mask is False."""
        if self.model is None:  # also the first call after Ray restarted this actor
            self.setup()
        device = next(self.model.parameters()).device
        out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)
        step = self.cfg.micro_batch_size
        for start in range(0, len(rollouts), step):
            rows = slice(start, start + step)
            batch = trim_padding(
                rollouts.prompt_ids[rows],
                rollouts.prompt_mask[rows],
                rollouts.response_ids[rows],
                rollouts.response_mask[rows],
            )
            logprobs = response_logprobs(self.model, *(t.to(device) for t in batch))
            out[rows, : logprobs.shape[1]] = logprobs.float().cpu()
        return out

"""Helpers every role shares to use an HF model: the CPU threads a process computes with, how a frozen model is
loaded and placed, and the pad id. Role modules import these from here, never from one another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def set_cpu_threads(threads: int) -> int:
    """Give this process `threads` torch threads when it computes on CPU: the count the resource plan gave its role
    (cluster/plan.py); 0, none planned: it keeps the count it has. -> the count. Ray starts an actor with
    OMP_NUM_THREADS = its logical CPUs, 1 for a learner, which would leave every other core idle while it trains."""
    if torch.cuda.is_available() or not threads:
        return torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def inference_placement() -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a frozen model: bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_frozen_model(auto_class: Any, model_dir: Path) -> PreTrainedModel:
    """An HF model (`auto_class.from_pretrained(model_dir)`) in eval mode with gradients off, on its device: how
    the reference, the reward models, the HF rollout engine and the evaluations load a model they do not train."""
    device, dtype = inference_placement()
    model = auto_class.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads prompts and responses: the tokenizer's pad token, else EOS (many HF models have none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def write_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A peft adapter dir (adapter_config.json, adapter_model.safetensors) from the learner's
    adapter (actors/training/lora.py): what `PeftModel.from_pretrained` and vLLM's LoRARequest load."""
    import json

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))

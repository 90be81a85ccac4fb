"""LoRA adapters (peft) on a learner's model: which modules get them, and the two views of a trained model that
leave the learner: the merged HF weights (export, and weight sync to engines that cannot take adapters) and the
adapter tensors alone (weight sync to vLLM, the `-adapter` export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import LoraConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor

ADAPTER = "default"  # peft's name of the one adapter we train
ADAPTER_SUFFIX = "-adapter"  # a LoRA model's adapter is exported beside its merged HF dir, as <dir>-adapter
PEFT_PREFIX = "base_model.model."  # what peft puts before every HF parameter name
HEADS = ("lm_head", "score", "classifier", "v_head", "value_head")  # output heads: trained whole or frozen, no LoRA


def target_modules(model: torch.nn.Module) -> list[str]:
    """The attention and MLP projections of `model`: the names (last component) of its Linear and GPT-2-style
    Conv1D layers inside the decoder, output heads left out. Reading them off the model covers every architecture
    (q_proj...down_proj for Llama, Qwen2, Mistral; qkv_proj, gate_up_proj for Phi-3; c_attn, c_proj, c_fc for GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear | Conv1D) and leaf not in HEADS and "." in name:
            names.add(leaf)
    if not names:
        raise ValueError(f"{type(model).__name__}: no Linear or Conv1D projection layers to put LoRA adapters on")
    return sorted(names)


def add_adapters(model: PreTrainedModel, cfg: LoraConfig) -> Any:
    """`model` with fresh LoRA adapters on `cfg.target_modules` (None: `target_modules(model)`): only the adapters
    train; a sequence-classification model's score head trains whole. -> the peft model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    scores = type(model).__name__.endswith("ForSequenceClassification")
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules else target_modules(model),
        task_type="SEQ_CLS" if scores else "CAUSAL_LM",  # SEQ_CLS keeps `score` trainable (modules_to_save)
        fan_in_fan_out=type(model).__name__.startswith("GPT2"),  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, peft_cfg)


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def merged_weights(model: Any) -> list[tuple[str, Tensor]]:
    """The HF-named weights of the base model with each adapter's update added (W + B A alpha/r), out of place:
    the trained model stays as it is. CPU copies."""
    out = []
    for name, p in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        tensor = p.detach()
        if ".base_layer." in name:
            owner, leaf = name.split(".base_layer.")
            if leaf == "weight":
                tensor = tensor + model.get_submodule(owner).get_delta_weight(ADAPTER).to(tensor.dtype)
            name = f"{owner}.{leaf}"
        name = name.replace(f".modules_to_save.{ADAPTER}.", ".")
        out.append((name.removeprefix(PEFT_PREFIX), tensor.to("cpu", copy=True)))
    return out


def adapter_weights(model: Any) -> list[tuple[str, Tensor]]:
    """The adapter tensors in peft's saved-adapter names (what `adapter_model.safetensors` holds), CPU copies."""
    from peft import get_peft_model_state_dict

    return [(n, t.detach().to("cpu", copy=True)) for n, t in get_peft_model_state_dict(model).items()]


def adapter_config(model: Any) -> dict[str, Any]:
    """The adapter's peft config as a plain dict (adapter_config.json), for whoever rebuilds the adapter."""
    d = model.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def trainable_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

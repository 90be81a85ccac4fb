"""Training engines for the learners (DeepSpeed ZeRO 0-3, or plain torch) behind one Protocol, chosen once in
`build_engine`; joining the process group, and writing an HF dir from an engine. The update they run is in
actors/training/update.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from actors.hf import set_cpu_threads
from actors.training.lora import adapter_weights, is_lora, merged_weights
from pipeline.config import LearnerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor


class TrainEngine(Protocol):
    """What a learner needs from a training backend (DeepSpeed | plain torch), chosen once in build_engine."""

    model: Callable[..., Any]  # the forward to call (a DeepSpeed engine wraps the HF model)
    module: PreTrainedModel  # the HF model itself: HF parameter names, save_pretrained
    device: torch.device

    @property
    def steps(self) -> int: ...  # optimizer updates taken
    @property
    def lr(self) -> float: ...  # LR of the next update

    def backward(self, loss: Tensor) -> None: ...
    def step(self) -> float: ...  # one optimizer update on the accumulated gradients -> grad norm before clipping
    def discard(self) -> None: ...  # drop the accumulated gradients without an update
    def full_weights(self, keep: bool) -> list[tuple[str, Tensor]]: ...  # collective under ZeRO-3
    def save_checkpoint(self, path: Path) -> None: ...
    def load_checkpoint(self, path: Path) -> None: ...


def init_distributed(cfg: LearnerConfig, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the learners' process group: gloo on CPU, NCCL on GPU."""
    # LOCAL_RANK 0: a Ray actor sees only its own GPU (CUDA_VISIBLE_DEVICES), which is then device 0.
    env = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    if cfg.backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist_backend)
    elif world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(dist_backend)


def build_engine(cfg: LearnerConfig, model: PreTrainedModel, rank: int, world_size: int) -> TrainEngine:
    """`cfg.backend`'s engine on `model`, with the torch threads the resource plan set (`cfg.cpu_threads`)."""
    set_cpu_threads(cfg.cpu_threads)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = DeepSpeedEngine if cfg.backend == "deepspeed" else TorchEngine
    return engine(cfg, model, rank, world_size)


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup: update k < warmup_steps uses lr * (k + 1) / (warmup_steps + 1); then constant lr, or with
    `decay_steps` (updates in all, warmup included) lr * (decay_steps - k) / (decay_steps - warmup_steps): down in
    equal steps to lr / (decay_steps - warmup_steps) at the last update, 0 after it."""

    def factor(k: int) -> float:
        if k < warmup_steps or decay_steps is None:
            return min(1.0, (k + 1) / (warmup_steps + 1))
        return max(0.0, (decay_steps - k) / max(1, decay_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(cfg: LearnerConfig, *, bf16: bool, grad_clip: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    adamw = {"lr": cfg.lr, "betas": list(cfg.adam_betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # We own the accumulation boundary: backward() accumulates, step() reduces and updates, so a step may
        # hold any number of micro-batches (the shard size is only known per call).
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        # torch's AdamW on CPU: DeepSpeed's fused Adam needs CUDA and its CPU Adam a JIT build.
        "optimizer": {"type": "AdamW", "params": {**adamw, "torch_adam": not bf16}},
        "zero_force_ds_cpu_optimizer": bf16,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3: bf16 with fp32 master weights on GPU, fp32 on CPU."""

    def __init__(self, cfg: LearnerConfig, model: PreTrainedModel, rank: int, world_size: int):
        import deepspeed

        bf16 = torch.cuda.is_available()
        # Stage 0 in fp32 clips with a helper whose norm it drops; we clip in a pre-step hook to report it.
        self._own_clip = cfg.grad_clip if cfg.zero_stage == 0 and not bf16 else 0.0  # 0: DeepSpeed clips
        config = deepspeed_config(cfg, bf16=bf16, grad_clip=0.0 if self._own_clip else cfg.grad_clip)
        self.ds, optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=trainable(model),
            config=config,
            lr_scheduler=lambda opt: warmup_schedule(opt, cfg.warmup_steps, cfg.lr_decay_steps),
        )
        self.model, self.module, self.device = self.ds, self.ds.module, self.ds.device
        self._zero3 = cfg.zero_stage == 3
        self._lora = is_lora(model)  # config checks keep LoRA off ZeRO-3
        self._norm = float("nan")
        if self._own_clip:
            optimizer.register_step_pre_hook(self._clip)

    def _clip(self, optimizer, args, kwargs) -> None:
        self._norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self._own_clip).item()

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss)

    def discard(self) -> None:
        self.ds.zero_grad()

    def step(self) -> float:
        self.ds.step()
        norm = self._norm if self._own_clip else self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    @property
    def steps(self) -> int:
        return self.ds.global_steps

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def full_weights(self, keep: bool) -> list[tuple[str, Tensor]]:
        import deepspeed

        if not keep and not self._zero3:
            return []
        if self._lora:
            return merged_weights(self.module) if keep else []
        out = []
        # One parameter at a time: never more than one full tensor gathered beyond the shards.
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=self._zero3):
                if keep:
                    out.append((name, p.detach().to("cpu", copy=True)))
        return out

    def save_checkpoint(self, path: Path) -> None:
        # With LoRA the frozen base is the init model's: the checkpoint holds the adapters (and head) only.
        self.ds.save_checkpoint(str(path), exclude_frozen_parameters=self._lora)

    def load_checkpoint(self, path: Path) -> None:
        # DeepSpeed's loader unpickles (torch.load(weights_only=False)): a checkpoint dir handed to --resume could
        # run code. Its files hold tensors plus a few plain DeepSpeed types, so load them weights-only instead.
        engine = self.ds.checkpoint_engine
        engine.load = weights_only_load
        try:
            loaded, _ = self.ds.load_checkpoint(str(path), load_module_strict=not self._lora)
        finally:
            del engine.load  # back to the class's method
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")


def weights_only_load(path: str, map_location=None) -> Any:
    """torch.load(weights_only=True) for DeepSpeed's checkpoint files, with the DeepSpeed types ZeRO 0-3
    checkpoints hold (found by loading them weights-only) allowed: each is plain data, none runs code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


class TorchEngine:
    """Plain torch AdamW in fp32, data-parallel by all-reducing gradients when there is more than one rank."""

    def __init__(self, cfg: LearnerConfig, model: PreTrainedModel, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.module = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            trainable(model), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = warmup_schedule(self.optimizer, cfg.warmup_steps, cfg.lr_decay_steps)
        self.steps = 0

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        params = trainable(self.module)
        for p in params:
            if p.grad is None:  # every rank must all-reduce the same tensors
                p.grad = torch.zeros_like(p)
            if self.world_size > 1:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world_size
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip).item()
        if math.isfinite(norm):  # else no update: accumulate_update reports bad/grad
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_weights(self, keep: bool) -> list[tuple[str, Tensor]]:
        if not keep:
            return []
        if is_lora(self.module):
            return merged_weights(self.module)
        return [(n, p.detach().to("cpu", copy=True)) for n, p in self.module.named_parameters()]

    def save_checkpoint(self, path: Path) -> None:
        if self.rank == 0:  # data-parallel ranks hold identical state
            path.mkdir(parents=True, exist_ok=True)
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save({**state, "model": self._weights(), "steps": self.steps}, path / "torch_engine.pt")

    def _weights(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of the model: all of it, or with LoRA what trains (the base is the init model's)."""
        if not is_lora(self.module):
            return self.module.state_dict()
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "torch_engine.pt", map_location=self.device, weights_only=True)
        result = self.module.load_state_dict(state["model"], strict=not is_lora(self.module))
        if result.unexpected_keys:
            raise ValueError(f"{path}: the checkpoint has weights this model lacks: {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


class Dist(NamedTuple):
    """Where a learner sits in its process group."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def start_engine(cfg: LearnerConfig, dist: Dist, seed: int, load_model: Callable[[], PreTrainedModel]) -> TrainEngine:
    """Join the process group, then load the model (same seed on every rank: new heads start identical)."""
    init_distributed(cfg, *dist)
    torch.manual_seed(seed)
    return build_engine(cfg, load_model(), dist.rank, dist.world_size)


def save_hf(engine: TrainEngine, rank: int, model_dir: Path, out_dir: Path, adapter_dir: Path | None = None) -> None:
    """Rank 0 writes an HF dir (config, weights, the tokenizer of model_dir); every rank joins the gather. A LoRA
    model is written merged, and its adapter alone to `adapter_dir` (a peft dir, for PeftModel.from_pretrained)."""
    from transformers import AutoTokenizer

    weights = engine.full_weights(keep=rank == 0)
    if rank != 0:
        return
    module = engine.module
    if is_lora(module):
        module.get_base_model().save_pretrained(out_dir, state_dict=dict(weights))
        if adapter_dir is not None:
            module.save_pretrained(adapter_dir)
    else:
        module.save_pretrained(out_dir, state_dict=dict(weights))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer updates: all of them, or with LoRA the adapters (and a score head)."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_update(engine: TrainEngine) -> list[tuple[str, Tensor]]:
    """The adapter tensors of a LoRA engine (what weight sync sends to engines that serve adapters)."""
    return adapter_weights(engine.module)

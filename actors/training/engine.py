"""Training engines for the learners (DeepSpeed ZeRO 0-3, or plain torch) behind one Protocol, and the batch
plumbing they share: equal shards per rank, micro-batches, and one optimizer update accumulated so that it equals
the single-process full-batch update whatever the micro-batch size, rank count or sequence lengths.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import torch

from actors.sequences import Layout, lengths_of, micro_batches, split_to
from pipeline.config import LearnerConfig

Tensor = torch.Tensor
Batch = TypeVar("Batch")  # a dataclass of per-sequence fields: TrainBatch, or Rollouts for compute_logprobs

# How many "units" each loss aggregation averages over: a micro-batch's loss weighs units_mb / units_step.
AGG_UNITS: dict[str, Callable[[Tensor], Tensor]] = {
    "token-mean": lambda mask: mask.sum(),
    "seq-mean-token-sum": lambda mask: mask.any(dim=-1).sum(),
    "seq-mean-token-mean": lambda mask: mask.any(dim=-1).sum(),
}


class TrainEngine(Protocol):
    """What a learner needs from a training backend (DeepSpeed | plain torch), chosen once in build_engine."""

    model: Callable[..., Any]  # the forward to call (a DeepSpeed engine wraps the HF model)
    module: torch.nn.Module  # the HF model itself: HF parameter names, save_pretrained
    device: torch.device
    steps: int  # optimizer updates taken
    lr: float  # LR of the next update

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


def build_engine(
    cfg: LearnerConfig, model: torch.nn.Module, rank: int, world_size: int, *, groups: int = 1
) -> TrainEngine:
    """`groups`: learner groups that train at the same time on these cores (2 for PPO: the policy and the critic),
    which share them in the default thread count."""
    set_cpu_threads(cfg.cpu_threads, world_size * groups)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = DeepSpeedEngine if cfg.backend == "deepspeed" else TorchEngine
    return engine(cfg, model, rank, world_size)


def set_cpu_threads(threads: int, ranks: int) -> int:
    """Give this process `threads` torch threads when it trains on CPU (0: the cores it may run on / `ranks`, the
    processes that train at the same time, at least 1). -> the count. Ray starts an actor with OMP_NUM_THREADS =
    its logical CPUs, 1 for a learner: on a CPU machine that leaves every other core idle while the learner
    trains, since in on-policy mode nothing else runs then (README, benchmarks: TRL's trainer uses every core)."""
    if torch.cuda.is_available():
        return torch.get_num_threads()
    n = threads or core_share(ranks)
    torch.set_num_threads(n)
    return n


def core_share(processes: int) -> int:
    """The cores this process may run on, split among `processes` that compute at the same time (at least 1)."""
    return max(1, len(os.sched_getaffinity(0)) // processes)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup: update k < warmup_steps uses lr * (k + 1) / (warmup_steps + 1); then constant lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup_steps + 1)))


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

    def __init__(self, cfg: LearnerConfig, model: torch.nn.Module, rank: int, world_size: int):
        import deepspeed

        bf16 = torch.cuda.is_available()
        # Stage 0 in fp32 clips with a helper whose norm it drops; we clip in a pre-step hook to report it.
        self._own_clip = cfg.grad_clip if cfg.zero_stage == 0 and not bf16 else None
        config = deepspeed_config(cfg, bf16=bf16, grad_clip=0.0 if self._own_clip else cfg.grad_clip)
        self.ds, optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=config,
            lr_scheduler=lambda opt: warmup_schedule(opt, cfg.warmup_steps),
        )
        self.model, self.module, self.device = self.ds, self.ds.module, self.ds.device
        self._zero3 = cfg.zero_stage == 3
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
        out = []
        # One parameter at a time: never more than one full tensor gathered beyond the shards.
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=self._zero3):
                if keep:
                    out.append((name, p.detach().to("cpu", copy=True)))
        return out

    def save_checkpoint(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path))

    def load_checkpoint(self, path: Path) -> None:
        # DeepSpeed's loader unpickles (torch.load(weights_only=False)): a checkpoint dir handed to --resume could
        # run code. Its files hold tensors plus a few plain DeepSpeed types, so load them weights-only instead.
        engine = self.ds.checkpoint_engine
        engine.load = weights_only_load
        try:
            loaded, _ = self.ds.load_checkpoint(str(path))
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

    def __init__(self, cfg: LearnerConfig, model: torch.nn.Module, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.module = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = warmup_schedule(self.optimizer, cfg.warmup_steps)
        self.steps = 0

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        params = list(self.module.parameters())
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
        return [(n, p.detach().to("cpu", copy=True)) for n, p in self.module.named_parameters()] if keep else []

    def save_checkpoint(self, path: Path) -> None:
        if self.rank == 0:  # data-parallel ranks hold identical state
            path.mkdir(parents=True, exist_ok=True)
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save({**state, "model": self.module.state_dict(), "steps": self.steps}, path / "torch_engine.pt")

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "torch_engine.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Sequences [start, stop) of a batch dataclass: every tensor and list field is sliced on dim 0."""
    return map_fields(batch, lambda v: v[start:stop])


def take(batch: Batch, index: Tensor) -> Batch:
    """The sequences `index` [b] (long, in that order) of a batch dataclass."""
    picked = index.tolist()
    return map_fields(batch, lambda v: v[index.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in picked])


def map_fields(batch: Batch, fn: Callable[[Any], Any]) -> Batch:
    """Apply fn to every per-sequence field (tensor or list) of a batch dataclass; scalars are kept."""
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor | list):
            changes[f.name] = fn(value)
    return dataclasses.replace(batch, **changes)


def shard(batch: Batch, world_size: int) -> list[Batch]:
    """Split a batch into `world_size` equal, contiguous shards (one per rank).

    Equal shards keep every rank at the same number of forward/backward passes, which ZeRO-3 needs: its
    parameter all-gathers are collectives."""
    n = len(batch)
    if n % world_size:
        raise ValueError(f"batch of {n} sequences does not split into {world_size} equal learner shards")
    size = n // world_size
    return [rows(batch, r * size, (r + 1) * size) for r in range(world_size)]


def concat_batches(batches: list[Batch]) -> Batch:
    """Join batches of one dataclass along dim 0. 2-D tensors of different widths are padded with zeros (False
    for masks): on the left for `prompt_*` fields, which are left-padded, on the right otherwise. Scalars and
    None fields come from the first batch."""
    changes = {}
    for f in dataclasses.fields(batches[0]):
        values = [getattr(b, f.name) for b in batches]
        if isinstance(values[0], list):
            changes[f.name] = [x for v in values for x in v]
        elif isinstance(values[0], Tensor):
            width = max(v.shape[1] for v in values) if values[0].dim() == 2 else 0
            left = f.name.startswith("prompt_")
            pad = [torch.nn.functional.pad(v, (width - v.shape[1], 0) if left else (0, width - v.shape[1]))
                   if v.dim() == 2 else v for v in values]
            changes[f.name] = torch.cat(pad)
    return dataclasses.replace(batches[0], **changes)


def global_sum(x: Tensor, world_size: int) -> Tensor:
    """Sum of a scalar over all ranks (x itself when there is one rank)."""
    if world_size > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def global_max(x: int, world_size: int, device: torch.device) -> int:
    """Largest x over all ranks (x itself when there is one rank): a collective, so every rank must call it."""
    if world_size == 1:
        return x
    t = torch.tensor(float(x), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank when `flag` is true on some rank: one all-reduce, so every rank must call it."""
    return bool(global_sum(torch.tensor(float(flag), device=device), world_size).item() > 0)


INPUTS = ("reward", "logprobs")  # what nonfinite_input names


def nonfinite_input(batch: Batch) -> str | None:
    """`reward` when the advantages or returns (made from the rewards) hold NaN or inf, `logprobs` when another
    float field does; None when all are finite."""
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return "reward" if f.name in ("advantages", "returns") else "logprobs"
    return None


SUMMED = "tokens/"  # metric keys that count work (tokens/real, tokens/computed): ranks' counts add up


def mean_metrics(metrics: list[dict[str, float]], weights: list[float] | None = None) -> dict[str, float]:
    """(Weighted) mean of each key over the dicts; keys ending in `_max` take the max, keys under `tokens/` are
    counts and add up."""
    weights = [1.0] * len(metrics) if weights is None else weights
    total = sum(weights) or 1.0
    out = {}
    for key in metrics[0]:
        if key.endswith("_max"):
            out[key] = max(m[key] for m in metrics)
        elif key.startswith(SUMMED):
            out[key] = sum(m[key] for m in metrics)
        else:
            out[key] = sum(w * m[key] for m, w in zip(metrics, weights, strict=True)) / total
    return out


class Dist(NamedTuple):
    """Where a learner sits in its process group."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def start_engine(
    cfg: LearnerConfig, dist: Dist, seed: int, load_model: Callable[[], torch.nn.Module], *, groups: int = 1
) -> TrainEngine:
    """Join the process group, then load the model (same seed on every rank: new heads start identical)."""
    init_distributed(cfg, *dist)
    torch.manual_seed(seed)
    return build_engine(cfg, load_model(), dist.rank, dist.world_size, groups=groups)


def save_hf(engine: TrainEngine, rank: int, model_dir: Path, out_dir: Path) -> None:
    """Rank 0 writes an HF dir (config, weights, the tokenizer of model_dir); every rank joins the gather."""
    from transformers import AutoTokenizer

    weights = engine.full_weights(keep=rank == 0)
    if rank == 0:
        engine.module.save_pretrained(out_dir, state_dict=dict(weights))
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)


def micro_batch_plan(batch, cfg: LearnerConfig, layout: Layout, world_size: int, device: torch.device, *,
                     sync: bool) -> list[Tensor]:
    """This rank's micro-batches of `batch` (index tensors): `cfg.micro_batch_size` sequences each, or up to
    `cfg.max_tokens_per_micro_batch` tokens as `layout` computes them. sync (a collective): as many micro-batches
    as the rank with the most, since ranks meet in a collective per micro-batch (accumulate_update, ZeRO-3)."""
    lengths = lengths_of(batch.prompt_mask, batch.response_mask)
    budget = cfg.max_tokens_per_micro_batch
    plan = micro_batches(lengths, rows=cfg.micro_batch_size, max_tokens=budget, tokens=layout.tokens)
    if sync and budget is not None:  # row counts give equal shards the same number already
        plan = split_to(plan, global_max(len(plan), world_size, device), lengths, layout.tokens)
    return plan


def collective_forwards(cfg: LearnerConfig, world_size: int) -> bool:
    """Whether a forward pass is a collective (ZeRO-3 gathers the parameters), so ranks must run as many."""
    return cfg.backend == "deepspeed" and cfg.zero_stage == 3 and world_size > 1


def to_device(batch: Batch, device: torch.device) -> Batch:
    return map_fields(batch, lambda v: v.to(device) if isinstance(v, Tensor) else v)


def accumulate_update(
    engine: TrainEngine,
    batch: Batch,
    *,
    micro_batch_size: int | None = None,
    plan: list[Tensor] | None = None,
    agg: str,
    world_size: int,
    loss_fn: Callable[[int, Batch], tuple[Tensor, dict[str, float]]],
) -> dict[str, float]:
    """One optimizer update over `batch`, in micro-batches: the index tensors of `plan` (every rank the same
    number of them), or else consecutive runs of `micro_batch_size` sequences. -> metrics (`grad_norm`
    included), weighted like the loss, so `loss/*` is this rank's whole-batch loss.

    loss_fn(i, micro_batch) returns the micro-batch loss aggregated with `agg`. It is weighted by the
    micro-batch's share of the step's units (tokens or sequences, summed over ranks) times world_size,
    because the engine averages gradients over ranks: the sum is the gradient of the full-batch loss, however
    the sequences are grouped into micro-batches."""
    bad = nonfinite_input(batch)
    flags = global_sum(torch.tensor([float(bad == q) for q in INPUTS], device=engine.device), world_size)
    if flags.sum().item() > 0:  # every rank skips, naming what some rank found
        return {f"bad/{q}": 1.0 for q, f in zip(INPUTS, flags.tolist(), strict=True) if f > 0}
    if plan is None:
        micro = [rows(batch, s, s + micro_batch_size) for s in range(0, len(batch), micro_batch_size)]
    else:
        micro = [take(batch, idx) for idx in plan]
    units = [float(AGG_UNITS[agg](mb.response_mask)) for mb in micro]
    total = float(global_sum(torch.tensor(sum(units), dtype=torch.float64, device=engine.device), world_size)) or 1.0
    metrics = []
    for i, mb in enumerate(micro):
        loss, m = loss_fn(i, mb)
        if any_rank(not torch.isfinite(loss).item(), world_size, engine.device):
            engine.discard()
            return {"bad/loss": 1.0}
        engine.backward(loss * (world_size * units[i] / total))
        metrics.append(m)
    out = {**mean_metrics(metrics, units), "grad_norm": engine.step()}
    if not math.isfinite(out["grad_norm"]):
        out["bad/grad"] = 1.0
    return out

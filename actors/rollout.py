"""The rollout role: sample G responses per prompt from the current policy weights, with per-token logprobs, and
take new weights in place without restarting the engine: actors/weight_sync.py sends them, `WeightSyncExtension`
(below, run inside vLLM's worker) loads them.

Two backends behind one small Protocol, chosen once from `rollout.engine`: vLLM (in-process engine) and
transformers `generate` (the fallback).

Logprob mode: `rollout_logprobs` are RAW logprobs, log_softmax of the model's logits before temperature and
top-p (vLLM's `logprobs_mode="raw_logprobs"`; log_softmax of `generate`'s `output_logits` for HF): the quantity the
learner computes with `actors.sequences.response_logprobs`, so rollout and learner compare like with like at any
temperature. At temperature 1 and top_p 1 they are also the logprobs of the distribution that was sampled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from actors.hf import load_frozen_model, pad_token_id, write_adapter
from pipeline.algo import token_logprobs
from pipeline.batches import pad_left, pad_right
from pipeline.config import RolloutConfig
from pipeline.types import PromptBatch, Rollouts, WeightUpdate

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sample:
    """One sampled response, unpadded, as a backend returns it."""

    prompt_ids: list[int]  # prompt tokens, BOS included
    token_ids: list[int]  # response tokens, the EOS included when finish_reason is "stop"
    logprobs: list[float]  # raw logprob of each response token
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


class Engine(Protocol):
    def __init__(
        self, cfg: RolloutConfig, model_dir: Path, tokenizer: PreTrainedTokenizerBase, *, seed: int, lora_rank: int = 0
    ): ...

    def sample(self, prompts: list[str], n: int, seed: int | None = None) -> list[Sample]:
        """len(prompts) * n samples, the n samples of one prompt consecutive, in prompt order."""
        ...

    def load_weights(self, named_tensors: dict[str, Tensor]) -> None:
        """Overwrite the named weights (HF names) in place; later samples use them."""
        ...


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`LLM(worker_extension_cls=...)`); its methods run on the worker through
    `llm.collective_rpc(name, ...)`.

    vLLM's worker already owns `update_weights`, `start_weight_update` and `init_weight_transfer_engine` (its
    NCCL/IPC API) and refuses an extension that redefines them, hence the distinct name."""

    if TYPE_CHECKING:  # what the vLLM worker this class extends provides
        model_runner: Any

        def reload_weights(self, *, weights_iterator: Iterator[tuple[str, Tensor]]) -> None: ...

    def reload_hf_weights(self, named_tensors: list[tuple[str, Tensor]]) -> None:
        # `reload_weights` maps HF names onto vLLM's fused layers and redoes the CPU backend's weight repacking;
        # calling `model_runner.model.load_weights` directly fails on CPU for exactly that repacking.
        self.reload_weights(weights_iterator=iter(named_tensors))
        repack_tied_layers(self.model_runner.get_model())


def repack_tied_layers(model: torch.nn.Module) -> list[str]:
    """Rebuild the CPU GEMM kernels of layers whose weight is tied to another layer's; returns their names.

    On CPU, vLLM packs a copy of each linear weight (`layer.cpu_linear`) after loading. A tied `lm_head` shares
    `embed_tokens.weight`, so an in-place reload updates the shared tensor through the embedding but never
    processes the head (no checkpoint name maps to it): its packed copy, which computes every logit, keeps the
    first weights. Re-running the head's weight processing repacks it from the shared tensor. No-op on GPU."""
    layers_by_weight: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            layers_by_weight.setdefault(id(weight), []).append((name, module))
    repacked = []
    for layers in layers_by_weight.values():
        if len(layers) < 2:
            continue
        for name, module in layers:
            method = getattr(module, "quant_method", None)
            if hasattr(module, "cpu_linear") and method is not None:
                method.process_weights_after_loading(module)
                repacked.append(name)
    return repacked


class VLLMEngine:
    """vLLM's offline `LLM`, run in-process. CPU: fp32, one worker. GPU: bf16, tensor parallel over the GPUs
    of the actor's placement bundle, and an NCCL weight-transfer engine for weight sync. With `lora_rank` > 0 it
    serves the base model of model_dir plus the newest LoRA adapter the learner sent (`load_adapter`)."""

    def __init__(
        self, cfg: RolloutConfig, model_dir: Path, tokenizer: PreTrainedTokenizerBase, *, seed: int, lora_rank: int = 0
    ):
        # The in-process engine core starts ~3x faster than vLLM's default engine process on CPU, and
        # `collective_rpc` hands our weight tensors to the worker as tensors. vLLM reads this at engine start.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        if not on_gpu and cfg.tensor_parallel_size != 1:
            raise ValueError(f"rollout.tensor_parallel_size={cfg.tensor_parallel_size}: vLLM on CPU needs 1")
        self.cfg = cfg
        self.lora_request: Any = None  # vLLM's LoRARequest of the adapter in use; None: the base weights
        self._adapters = Path(tempfile.mkdtemp(prefix="raylign-adapters-")) if lora_rank else None
        self.llm = LLM(
            model=str(model_dir),
            seed=seed,
            logprobs_mode="raw_logprobs",
            # Eager: no graph capture at start-up, and weights reloaded in place need no re-capture.
            enforce_eager=True,
            tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}",
            **(_gpu_engine_args(cfg) if on_gpu else _cpu_engine_args(cfg)),
            **_lora_engine_args(lora_rank),
        )

    def sample(self, prompts: list[str], n: int, seed: int | None = None) -> list[Sample]:
        from vllm import SamplingParams

        # logprobs=0: only the sampled token's logprob (in `logprobs_mode`), no top-k alternatives.
        # detokenize=False: the worker decodes for both backends alike (vLLM's incremental detokenizer would
        # drop a trailing partial UTF-8 character that tokenizer.decode keeps).
        # A seed per prompt (seed + i) makes a batch's samples independent of what the engine sampled before,
        # so a resumed run draws the same samples as an uninterrupted one.
        params = [
            SamplingParams(
                n=n,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                logprobs=0,
                detokenize=False,
                seed=None if seed is None else seed + i,
            )
            for i in range(len(prompts))
        ]
        samples = []
        for out in self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request):
            for c in out.outputs:
                logprobs = [step[token].logprob for step, token in zip(c.logprobs, c.token_ids, strict=True)]
                reason = _finish_reason(c.finish_reason)
                samples.append(Sample(list(out.prompt_token_ids), list(c.token_ids), logprobs, reason))
        return samples

    def load_weights(self, named_tensors: dict[str, Tensor]) -> None:
        self.llm.collective_rpc("reload_hf_weights", args=(list(named_tensors.items()),))
        self.reset_prefix_cache()

    def load_adapter(self, version: int, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Serve weight version `version` as a new LoRA adapter on the base weights: written as a peft dir that vLLM
        loads on the next generate (one adapter slot: the previous one is evicted). Its id is the version, so the
        prefix cache never mixes two adapters' KV blocks."""
        from vllm.lora.request import LoRARequest

        if self._adapters is None:
            raise RuntimeError("this engine was started without LoRA (lora.rank 0); it takes full weights only")
        path = self._adapters / f"v{version}"
        write_adapter(path, config, tensors)
        old = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{version}", version, str(path))
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def reset_prefix_cache(self) -> None:
        # Prefix caching is on (also on CPU): without this, prompts seen before the update would reuse KV blocks
        # computed with the old weights, and their responses would mix two policies.
        self.llm.reset_prefix_cache()


def _cpu_engine_args(cfg: RolloutConfig) -> dict:
    return {
        "dtype": "float32",
        "distributed_executor_backend": "uni",
        # A KV-cache share of RAM (`gpu_memory_utilization`) fails on CPU with vLLM's default 0.92; give bytes.
        "kv_cache_memory_bytes": cfg.kv_cache_memory_bytes,
    }


def _lora_engine_args(rank: int) -> dict:
    """vLLM's LoRA settings for adapters of rank `rank` (0: LoRA off): one adapter at a time, the newest."""
    if not rank:
        return {}
    slots = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM takes
    if rank > slots[-1]:
        raise ValueError(f"lora.rank={rank}: vLLM serves adapters up to rank {slots[-1]}")
    return {"enable_lora": True, "max_lora_rank": next(s for s in slots if s >= rank), "max_loras": 1}


def _gpu_engine_args(cfg: RolloutConfig) -> dict:
    """ "mp" spawns one worker per GPU that Ray made visible to this actor (its bundle)."""
    from vllm.config import WeightTransferConfig

    return {
        "dtype": "bfloat16",
        "distributed_executor_backend": "uni" if cfg.tensor_parallel_size == 1 else "mp",
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "weight_transfer_config": WeightTransferConfig(backend="nccl"),
    }


def _finish_reason(reason: str | None) -> str:
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with reason {reason!r}; expected 'stop' or 'length'")
    return reason


class HFEngine:
    """transformers `generate` with sampling: the fallback backend, and the reference the vLLM one is checked
    against. Weight updates are `load_state_dict` of the named tensors."""

    def __init__(
        self, cfg: RolloutConfig, model_dir: Path, tokenizer: PreTrainedTokenizerBase, *, seed: int, lora_rank: int = 0
    ):
        # lora_rank is not used: LoRA runs sync merged weights to this engine (pipeline/rl_roles.py says so).
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = load_frozen_model(AutoModelForCausalLM, model_dir)
        self.pad_id = pad_token_id(tokenizer)
        # generate() samples from torch's global generator; this process is this worker's alone.
        torch.manual_seed(seed)

    @torch.inference_mode()
    def sample(self, prompts: list[str], n: int, seed: int | None = None) -> list[Sample]:
        if seed is not None:
            torch.manual_seed(seed)
        rows = [self.tokenizer(p).input_ids for p in prompts for _ in range(n)]
        prompt_ids, prompt_mask = pad_left(rows, self.pad_id)
        device = self.model.device
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.long().to(device),
            max_new_tokens=self.cfg.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits, before temperature / top-p (output_scores are processed)
            **self._sampling_args(),
        )
        tokens = out.sequences[:, prompt_ids.shape[1] :]
        logprobs = token_logprobs(torch.stack(out.logits, dim=1), tokens).cpu()
        tokens = tokens.cpu()
        samples = []
        for i, row in enumerate(rows):
            eos_at = (tokens[i] == eos).nonzero()
            # generate() pads a finished row with pad ids until the longest row ends.
            length = int(eos_at[0]) + 1 if len(eos_at) else tokens.shape[1]
            reason = "stop" if len(eos_at) else "length"
            samples.append(Sample(row, tokens[i, :length].tolist(), logprobs[i, :length].tolist(), reason))
        return samples

    def _sampling_args(self) -> dict:
        if self.cfg.temperature == 0:
            return {"do_sample": False}
        # top_k=0: transformers otherwise applies its global default top_k=50, which vLLM does not.
        return {"do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": 0}

    def load_weights(self, named_tensors: dict[str, Tensor]) -> None:
        result = self.model.load_state_dict(named_tensors, strict=False)  # a partial update is allowed
        if result.unexpected_keys:
            raise ValueError(f"weight update names unknown parameters: {result.unexpected_keys[:5]}")


ENGINES: dict[str, type[Engine]] = {"vllm": VLLMEngine, "hf": HFEngine}


class RolloutWorker:
    """Samples G responses per prompt with one engine. Plain class; made a Ray actor where it is spawned
    (`ray.remote(num_cpus=...)(RolloutWorker)`). Calls are serial in an actor, so `generate` never overlaps a
    weight load and each batch comes from exactly one weight version."""

    def __init__(self, cfg: RolloutConfig, model_dir: Path, *, seed: int, board: Any = None, lora_rank: int = 0):
        self.cfg = cfg
        self.lora_rank = lora_rank  # > 0: the vLLM engine serves LoRA adapters on model_dir's weights
        self.model_dir = Path(model_dir)
        self.seed = seed
        self.board = board  # a WeightBoard actor: sign in, and catch up on weights after a restart
        self._engine: Engine | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._pad_id: int | None = None
        self._version = 0  # the weights in model_dir

    def setup(self) -> None:
        """Start the engine. Also runs on the first call after Ray restarted this actor (a crash): then the
        engine holds model_dir's weights, so it loads the newest update from the board first."""
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._tokenizer, self._pad_id = tokenizer, pad_token_id(tokenizer)
        self._engine = ENGINES[self.cfg.engine](
            self.cfg, self.model_dir, tokenizer, seed=self.seed, lora_rank=self.lora_rank
        )
        if self.board is not None:
            ray.get(self.board.sign_in.remote())
            latest = ray.get(self.board.latest.remote())
            if latest:
                self.load_weights(ray.get(latest[0]))

    def generate(self, batch: PromptBatch) -> Rollouts:
        """P prompts -> B = P * G rollouts, the G samples of a prompt consecutive; CPU tensors."""
        engine, tokenizer, pad_id = self._started()
        g = batch.samples_per_prompt
        samples = engine.sample(batch.prompts, g, batch.seed)
        prompt_ids, prompt_mask = pad_left([s.prompt_ids for s in samples], pad_id)
        response_ids, response_mask = pad_right([s.token_ids for s in samples], pad_id, torch.long)
        rollout_logprobs, _ = pad_right([s.logprobs for s in samples], 0.0, torch.float32)
        return Rollouts(
            prompts=[p for p in batch.prompts for _ in range(g)],
            responses=tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            rollout_logprobs=rollout_logprobs,
            finish_reasons=[s.finish_reason for s in samples],
            weight_version=self._version,
            group_size=g,
        )

    def load_weights(self, update: WeightUpdate) -> None:
        """Take the learner's weights in place (no engine restart); later rollouts carry `update.version`."""
        engine, _, _ = self._started()
        if update.version < self._version:
            # In async mode a late update must not roll the weights back behind a newer one.
            raise ValueError(f"weight update version {update.version} is older than the loaded {self._version}")
        if update.adapter is not None:
            if not isinstance(engine, VLLMEngine):
                raise TypeError(
                    f"a LoRA adapter update needs rollout.engine=vllm (this worker runs {self.cfg.engine!r})"
                )
            engine.load_adapter(update.version, update.adapter, update.named_tensors)
        else:
            engine.load_weights(update.named_tensors)
        self._version = update.version

    def _started(self) -> tuple[Engine, PreTrainedTokenizerBase, int]:
        """The engine, tokenizer and pad id, set up first if this is the first call."""
        if self._engine is None:
            self.setup()
        if self._engine is None or self._tokenizer is None or self._pad_id is None:
            raise RuntimeError("the rollout engine did not start")
        return self._engine, self._tokenizer, self._pad_id

    def weight_version(self) -> int:
        return self._version

    # ---- GPU weight sync: vLLM's NCCL weight-transfer engine, driven by actors.weight_sync._broadcast_nccl. ----
    # The names mirror vLLM's `VLLMWeightSyncClient` protocol.

    def engine_world_size(self) -> int:
        """GPU workers of this engine, i.e. NCCL ranks it adds to the weight-transfer group."""
        return self.cfg.tensor_parallel_size

    def init_weight_transfer(self, init_info: dict) -> None:
        self._vllm().llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def start_weight_update(self) -> None:
        self._vllm().llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._vllm().llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self, version: int) -> None:
        engine = self._vllm()
        engine.llm.collective_rpc("finish_weight_update")
        engine.reset_prefix_cache()
        self._version = version

    def _vllm(self) -> VLLMEngine:
        if not isinstance(self._engine, VLLMEngine):
            raise TypeError(f"NCCL weight sync needs rollout.engine=vllm (this worker runs {self.cfg.engine!r})")
        return self._engine

"""The reward role: scores (prompt, response) pairs with a reward model or an ensemble of them, a reward function
and a remote HTTP reward, and sums the sources with `reward.weights`.

Each source is a small class behind `Scorer`, listed in `SCORERS`. A scorer returns [K, B] scores from K members
(K > 1 only for a reward-model ensemble); the worker reduces them with `ensemble_mean_std` and subtracts
`uncertainty_penalty * std` (Coste et al. 2023), which leaves single-member sources unchanged.
"""

from __future__ import annotations

import importlib
import json
import numbers
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.hf import load_frozen_model
from actors.scoring import choose_score_layout, reward_model_inputs, score_plan
from pipeline.algo import ensemble_mean_std, uncertainty_penalized
from pipeline.config import RewardConfig, RewardSource
from pipeline.errors import ConfigError
from pipeline.types import Rollouts

Tensor = torch.Tensor


class RewardError(RuntimeError):
    """A reward source returned something that is not one finite number per sequence."""


class RemoteRewardError(RewardError):
    """The remote reward failed on every attempt; carries the URL, the attempts made and the last reason."""

    def __init__(self, url: str, attempts: int, reason: str):
        super().__init__(f"remote reward {url} failed after {attempts} attempt(s); last: {reason}")
        self.url, self.attempts, self.reason = url, attempts, reason

    def __reduce__(self):
        # Ray pickles exceptions back to the caller; the default would call __init__ with the message only.
        return type(self), (self.url, self.attempts, self.reason)


@dataclass(frozen=True)
class RewardScores:
    """Rewards of B sequences, CPU float32 tensors."""

    scores: Tensor  # [B] the reward to optimize: sum over sources of weight * part
    parts: dict[str, Tensor]  # source ("model", "function", "url") -> [B] its unweighted, penalized reward
    model_mean: Tensor | None = None  # [B] mean over the reward-model ensemble, when a model is used
    model_std: Tensor | None = None  # [B] population std over the ensemble (0 for one model)


def checked_rewards(values, count: int, source: str) -> Tensor:
    """A source's return value -> [count] float32, or RewardError naming the source and what is wrong."""
    if hasattr(values, "tolist"):  # a tensor or numpy array
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise RewardError(f"{source} returned {type(values).__name__}, expected a list of {count} floats")
    if len(values) != count:
        raise RewardError(f"{source} returned {len(values)} rewards for {count} sequences")
    for i, v in enumerate(values):
        # bool is an int subclass, but True as a reward is a bug, not 1.0. NaN and inf pass: the learners skip
        # (and count) a step whose rewards are not finite, and the run stops after run.max_bad_steps of them.
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"{source} returned {v!r} at index {i}; rewards must be numbers")
    return torch.tensor(values, dtype=torch.float32)


# --- reward sources ---


class Scorer(Protocol):
    @classmethod
    def from_config(cls, cfg: RewardConfig, model_dirs: Sequence[Path]) -> Scorer: ...

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """Rewards of B (prompt, response) pairs from K members: [K, B] float32 on CPU."""
        ...


class ModelScorer:
    """One reward model (HF sequence-classification dir with its tokenizer) or an ensemble of K of them."""

    def __init__(
        self,
        model_dirs: Sequence[Path],
        micro_batch_size: int,
        *,
        packing: bool = True,
        max_tokens_per_micro_batch: int | None = None,
    ):
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens_per_micro_batch
        self.members = [self._load(Path(d), packing, quiet=k > 0) for k, d in enumerate(model_dirs)]

    @classmethod
    def from_config(cls, cfg: RewardConfig, model_dirs: Sequence[Path]) -> ModelScorer:
        return cls(
            model_dirs,
            cfg.micro_batch_size,
            packing=cfg.packing,
            max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
        )

    @staticmethod
    def _load(model_dir: Path, packing: bool, *, quiet: bool):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_frozen_model(AutoModelForSequenceClassification, model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # HF finds each row's last token by its pad id; without one it cannot score a padded batch.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        device = next(model.parameters()).device
        return tokenizer, model, choose_score_layout(model, model, device, packing, who="reward model", quiet=quiet)

    @torch.inference_mode()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        members = []
        for tokenizer, model, layout in self.members:
            device = next(model.parameters()).device
            enc = reward_model_inputs(tokenizer, prompts, responses)
            input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            out = torch.zeros(len(prompts))
            for idx in score_plan(attention_mask, layout, rows=self.micro_batch_size, max_tokens=self.max_tokens):
                out[idx] = layout.scores(model, input_ids[idx.to(device)], attention_mask[idx.to(device)]).cpu()
            members.append(out)
        return torch.stack(members)


def import_reward_function(spec: str) -> Callable:
    """`"module:function"` -> the callable, or ConfigError naming reward.function."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.function = {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward.function = {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def gold_scores(spec: str, prompts: list[str], responses: list[str]) -> list[float]:
    """The gold reward `spec` ("module:function": eval.gold_reward, or the synthetic task's hidden reward) of B
    (prompt, response) pairs: [B]. It measures samples beside the reward being optimized, never in it."""
    return [float(x) for x in import_reward_function(spec)(prompts, responses)]


class FunctionScorer:
    """A Python reward function `f(prompts, responses) -> list[float]` (DESIGN.md `reward.function`)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = import_reward_function(spec)

    @classmethod
    def from_config(cls, cfg: RewardConfig, model_dirs: Sequence[Path]) -> FunctionScorer:
        if cfg.function is None:
            raise ConfigError("reward.function is not set")
        return cls(cfg.function)

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        values = self.fn(list(prompts), list(responses))
        return checked_rewards(values, len(prompts), f"reward.function {self.spec}")[None]


class _Retry(Exception):
    """One failed remote attempt that another attempt may fix; the message is the reason."""


class RemoteScorer:
    """A remote reward: POST {"prompts": [...], "responses": [...]} -> {"rewards": [...]}, standard library only.

    Timeouts, connection errors, 5xx (and 408/429), malformed replies and a wrong number of rewards are retried up
    to `max_retries` times, waiting backoff_s, 2 * backoff_s, ...; other 4xx fail at once. `timeout_s` bounds the
    connection and each read, and the body read as a whole, so an attempt cannot hang."""

    def __init__(self, url: str, *, timeout_s: float, max_retries: int, backoff_s: float):
        self.url, self.timeout_s, self.max_retries, self.backoff_s = url, timeout_s, max_retries, backoff_s

    @classmethod
    def from_config(cls, cfg: RewardConfig, model_dirs: Sequence[Path]) -> RemoteScorer:
        if cfg.url is None:
            raise ConfigError("reward.url is not set")
        return cls(cfg.url, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s)

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(body, len(prompts))[None]
            except _Retry as e:
                reason = str(e)
            except urllib.error.HTTPError as e:  # a 4xx: the request itself is wrong, retrying cannot help
                raise RemoteRewardError(self.url, attempt + 1, f"HTTP {e.code} {e.reason}") from None
        raise RemoteRewardError(self.url, attempts, reason)

    def _post(self, body: bytes, count: int) -> Tensor:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = b""
                # read1: whatever has arrived (one recv), so the deadline is checked while bytes trickle in
                while chunk := response.read1(1 << 16):
                    data += chunk
                    if time.monotonic() > deadline:  # a server trickling bytes would reset the per-read timeout
                        raise TimeoutError(f"reply not complete after {self.timeout_s} s")
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in (408, 429):
                raise _Retry(f"HTTP {e.code} {e.reason}") from None
            raise
        except (OSError, ValueError) as e:  # URLError, timeouts, resets (OSError); http.client protocol errors
            raise _Retry(f"{type(e).__name__}: {e}") from None
        try:
            rewards = json.loads(data)["rewards"]
            return checked_rewards(rewards, count, "remote reward")
        except (ValueError, TypeError, KeyError, RewardError) as e:  # ValueError covers JSON and UTF-8 decoding
            raise _Retry(f"bad reply ({type(e).__name__}: {e}): {data[:200]!r}") from None


SCORERS: dict[RewardSource, type[Scorer]] = {"model": ModelScorer, "function": FunctionScorer, "url": RemoteScorer}


def configured_sources(cfg: RewardConfig, model_dirs: Sequence[Path]) -> list[RewardSource]:
    """The reward sources this config turns on, in SCORERS order."""
    given = {"model": len(model_dirs) > 0, "function": cfg.function is not None, "url": cfg.url is not None}
    return [name for name in SCORERS if given[name]]


class RewardWorker:
    """Scores rollouts with every configured source. Plain class; made a Ray actor where it is spawned.

    model_dirs: the reward model, or the K members of an ensemble (empty when no model is used)."""

    def __init__(self, cfg: RewardConfig, model_dirs: Sequence[Path] = (), *, board: Any = None):
        self.cfg = cfg
        self.model_dirs = [Path(d) for d in model_dirs]
        self.scorers: dict[RewardSource, Scorer] = {}
        self.board = board  # a WeightBoard actor to sign in with (restarts are counted there)

    def setup(self) -> None:
        sources = configured_sources(self.cfg, self.model_dirs)
        if not sources:
            raise ConfigError(
                "no reward source: set reward.function or reward.url, or give a reward model "
                "(model.reward or the `reward` stage)"
            )
        if "model" in self.cfg.weights and "model" not in sources:
            raise ConfigError("reward.weights gives a weight for 'model', but the run has no reward model")
        self.scorers = {name: SCORERS[name].from_config(self.cfg, self.model_dirs) for name in sources}
        if self.board is not None:
            ray.get(self.board.sign_in.remote())

    def load_reward_models(self, model_dirs: Sequence[Path]) -> None:
        """Score with these reward-model dirs from now on (the other sources stay): the `irl` stage's reward changes
        every round, and a live worker can take it without a restart. Calls are serial in an actor, so no batch is
        scored by a mix of old and new models."""
        if not model_dirs or "model" not in self.scorers:
            raise ValueError("load_reward_models needs reward-model dirs and a worker set up with a reward model")
        self.model_dirs = [Path(d) for d in model_dirs]
        self.scorers["model"] = ModelScorer.from_config(self.cfg, self.model_dirs)

    def score(self, rollouts: Rollouts) -> RewardScores:
        return self.score_texts(rollouts.prompts, rollouts.responses)

    def score_texts(self, prompts: list[str], responses: list[str]) -> RewardScores:
        """Rewards of B (prompt, response) texts; `score` for data that is not a Rollouts (demos, preferences)."""
        if not self.scorers:  # also the first call after Ray restarted this actor
            self.setup()
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores = torch.zeros(len(prompts))
        parts: dict[str, Tensor] = {}
        mean_std: dict[str, tuple[Tensor, Tensor]] = {}
        for name, scorer in self.scorers.items():
            if prompts:
                mean_std[name] = ensemble_mean_std(scorer.score(list(prompts), list(responses)))
            else:  # an empty shard: no empty HTTP request, no forward over zero rows
                mean_std[name] = (torch.zeros(0), torch.zeros(0))
            parts[name] = uncertainty_penalized(*mean_std[name], self.cfg.uncertainty_penalty)
            scores = scores + self.cfg.weight(name) * parts[name]
        model_mean, model_std = mean_std.get("model", (None, None))
        return RewardScores(scores=scores, parts=parts, model_mean=model_mean, model_std=model_std)

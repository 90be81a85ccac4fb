"""The reward role: scores (prompt, response) pairs with a reward model or an ensemble of them, a reward function
and a remote HTTP reward, and sums the sources with `reward.weights`.

Each source is a small class behind `Scorer`, listed in `SCORERS`. A scorer returns [K, B] scores from K members
(K > 1 only for a reward-model ensemble); the worker reduces them with `ensemble_mean_std` and subtracts
`uncertainty_penalty * std` (Coste et al. 2023), which leaves single-member sources unchanged.
"""

from __future__ import annotations

import importlib
import json
import logging
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding

from actors.hf import load_frozen_model
from actors.sequences import micro_batches, outputs_differ
from pipeline.algo import ensemble_mean_std, uncertainty_penalized
from pipeline.config import RewardConfig
from pipeline.errors import ConfigError
from pipeline.types import Rollouts

Tensor = torch.Tensor
log = logging.getLogger(__name__)


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


# --- the reward-model input convention (DESIGN.md); reward training and export reuse these ---


def reward_model_text(tokenizer, prompt: str, response: str) -> str:
    """The text a reward model scores: the chat template's (user: prompt, assistant: response) rendering when the
    tokenizer has a template, else the plain concatenation `prompt + response`."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt + response


def reward_model_inputs(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> BatchEncoding:
    """Padded `input_ids` and `attention_mask` [B, L] of the convention's texts, on the tokenizer's padding side."""
    texts = [reward_model_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    # A rendered chat template already holds the special tokens (BOS); adding them again would double them.
    return tokenizer(texts, padding=True, add_special_tokens=not tokenizer.chat_template, return_tensors="pt")


def scored_positions(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """Index in each row of the token whose output the score head reads: [B] long. transformers' rule for sequence
    classification (the rightmost token that is not the pad id), so an exported model scores the same anywhere;
    without a pad id, the last real token."""
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    scored = attention_mask.bool() if pad_token_id is None else input_ids != pad_token_id
    return (columns * scored).argmax(dim=1)


def reward_model_scores(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The single logit of a sequence-classification model at each row's last real token, from padded rows: [B]
    float32. Columns that are padding in every row are dropped first (a micro-batch of short rows costs less).

    Positions count only real tokens (as in actors.sequences.join): a model with absolute position embeddings
    would otherwise score a left-padded row differently (RoPE models are shift-invariant anyway)."""
    used = attention_mask.bool().any(dim=0)
    input_ids, attention_mask = input_ids[:, used], attention_mask[:, used]
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, 0].float()


# Most tokens one packed row holds (unless one sequence is longer): attention builds a dense block-diagonal mask
# over a row, so its cost grows with the row's length squared; a few short rows keep it near the padded rows'.
ROW_TOKENS = 256


def packed_rows(lengths: Tensor, row_tokens: int = ROW_TOKENS) -> list[Tensor]:
    """Sequences of `lengths` [b] (or [b, 1]) real tokens put into rows of at most max(row_tokens, the longest)
    tokens, first-fit decreasing (actors.sequences.micro_batches): one index tensor per row."""
    lengths = lengths.reshape(-1, 1)
    capacity = max(row_tokens, int(lengths.max()))
    return micro_batches(lengths, rows=len(lengths), max_tokens=capacity, tokens=lambda x: int(x.sum()))


def packed_row_tokens(lengths: Tensor, row_tokens: int = ROW_TOKENS) -> int:
    """Tokens one packed scoring forward computes: rows x the fullest row's tokens (the rest of a row is filler)."""
    lengths = lengths.reshape(-1)
    rows = packed_rows(lengths, row_tokens)
    return len(rows) * max(int(lengths[r].sum()) for r in rows)


def packed_reward_scores(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, *, row_tokens: int = ROW_TOKENS
) -> Tensor:
    """`reward_model_scores` from packed rows [R, W]: the real tokens of the B sequences concatenated into a few
    rows (packed_rows), positions restarting at 0 per sequence, the rest of a row a filler block of pad ids with
    its own positions; no attention mask and no cache (as actors.sequences.pack, so transformers builds the
    block-diagonal mask). The backbone runs once, the score head on the B scored positions only: [B] float32.

    model: an HF sequence-classification model (a DeepSpeed engine passes `base_model`, `score`, `config` through)
    whose head is a `score` module, as in Llama, Qwen2, Mistral, GPT-2 and most decoder-only models."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no `score` head to apply at packed positions")
    device, real = input_ids.device, attention_mask.bool()
    # a DeepSpeed engine passes the model's attributes through, but its own `config` is DeepSpeed's
    pad_id = getattr(model, "module", model).config.pad_token_id
    scored = scored_positions(input_ids, attention_mask, pad_id)
    sequences = torch.arange(len(input_ids), device=device)
    if not real[sequences, scored].all():
        raise ValueError("packed scores: a row has no real token to score")
    lengths = real.sum(dim=1).cpu()
    row_of, start, used = torch.zeros(len(lengths), dtype=torch.long), torch.zeros(len(lengths), dtype=torch.long), []
    for r, idx in enumerate(packed_rows(lengths, row_tokens)):
        row_of[idx] = r
        start[idx] = lengths[idx].cumsum(0) - lengths[idx]  # each sequence's first column in its row
        used.append(int(lengths[idx].sum()))
    row_of, start, used = row_of.to(device), start.to(device), torch.tensor(used, device=device)
    width = int(used.max())
    position = real.long().cumsum(dim=1) - 1  # [B, L]: 0, 1, ... within each sequence
    column = start[:, None] + position
    rows = row_of[:, None].expand_as(position)
    ids = torch.full((len(used), width), pad_id or 0, dtype=input_ids.dtype, device=device)
    positions = torch.arange(width, device=device).repeat(len(used), 1) - used[:, None]  # filler: 0, 1, ...
    ids[rows[real], column[real]] = input_ids[real]
    positions[rows[real], column[real]] = position[real]
    # attention_mask=None and use_cache=False: the only way transformers reads the packing from position_ids.
    hidden = model.base_model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)[0]
    return head(hidden[row_of, column[sequences, scored]])[:, 0].float()


@dataclass(frozen=True)
class ScoreLayout:
    """How a micro-batch of reward-model rows becomes one forward pass (the scoring twin of actors.sequences.Layout).
    scores(model, input_ids [b, L], attention_mask [b, L]) -> [b] float32; tokens(lengths [b, 1]) -> tokens that
    forward computes."""

    name: str
    scores: Callable[[torch.nn.Module, Tensor, Tensor], Tensor]
    tokens: Callable[[Tensor], int]


SCORE_LAYOUTS: dict[str, ScoreLayout] = {
    "padded": ScoreLayout("padded", reward_model_scores, lambda lengths: len(lengths) * int(lengths.max())),
    "packed": ScoreLayout("packed", packed_reward_scores, packed_row_tokens),
}


def score_lengths(attention_mask: Tensor) -> Tensor:
    """Real tokens of each reward-model row: [B, 1] long on CPU, the lengths micro_batches and ScoreLayout take."""
    return attention_mask.sum(dim=1, keepdim=True).long().cpu()


def score_probe(model: torch.nn.Module, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two left-padded rows for choose_score_layout: a long one (12 tokens) and a short one (4), no pad ids."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(config.get_text_config().vocab_size, 1000), (2, 12), generator=g)
    if config.pad_token_id is not None:
        ids[ids == config.pad_token_id] = (config.pad_token_id + 1) % config.get_text_config().vocab_size
    mask = torch.tensor([[1] * 12, [0] * 8 + [1] * 4])
    return ids.masked_fill(mask == 0, config.pad_token_id or 0).to(device), mask.to(device)


def choose_score_layout(
    model, module: torch.nn.Module, device: torch.device, packing: bool, *, who: str, quiet: bool = False
) -> ScoreLayout:
    """The packed scoring layout when `packing` is on and packed scores of score_probe equal padded ones (as
    actors.sequences.choose_layout decides for causal LMs), else the padded one, with one log line naming why."""
    if not packing:
        return SCORE_LAYOUTS["padded"]
    batch = score_probe(module, device)
    try:
        with torch.no_grad():
            problem = outputs_differ(reward_model_scores(model, *batch), packed_reward_scores(model, *batch), module)
    except (TypeError, ValueError, RuntimeError) as e:
        problem = f"packed forward failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if problem is None:
        return SCORE_LAYOUTS["packed"]
    if not quiet:
        log.warning("%s: padded forwards instead of packed: %s %s", who, type(module).__name__, problem)
    return SCORE_LAYOUTS["padded"]


def score_plan(attention_mask: Tensor, layout: ScoreLayout, *, rows: int, max_tokens: int | None) -> list[Tensor]:
    """Micro-batches (index tensors covering the B rows once) of `rows` rows each, or up to `max_tokens` tokens as
    `layout` computes them, longest first (actors.sequences.micro_batches)."""
    return micro_batches(score_lengths(attention_mask), rows=rows, max_tokens=max_tokens, tokens=layout.tokens)


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


SCORERS: dict[str, type] = {"model": ModelScorer, "function": FunctionScorer, "url": RemoteScorer}


def configured_sources(cfg: RewardConfig, model_dirs: Sequence[Path]) -> list[str]:
    """The reward sources this config turns on, in SCORERS order."""
    given = {"model": len(model_dirs) > 0, "function": cfg.function is not None, "url": cfg.url is not None}
    return [name for name in SCORERS if given[name]]


class RewardWorker:
    """Scores rollouts with every configured source. Plain class; made a Ray actor where it is spawned.

    model_dirs: the reward model, or the K members of an ensemble (empty when no model is used)."""

    def __init__(self, cfg: RewardConfig, model_dirs: Sequence[Path] = (), *, board: Any = None):
        self.cfg = cfg
        self.model_dirs = [Path(d) for d in model_dirs]
        self.scorers: dict[str, Scorer] = {}
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
        parts, mean_std = {}, {}
        for name, scorer in self.scorers.items():
            if prompts:
                mean_std[name] = ensemble_mean_std(scorer.score(list(prompts), list(responses)))
            else:  # an empty shard: no empty HTTP request, no forward over zero rows
                mean_std[name] = (torch.zeros(0), torch.zeros(0))
            parts[name] = uncertainty_penalized(*mean_std[name], self.cfg.uncertainty_penalty)
            scores = scores + self.cfg.weight(name) * parts[name]
        model_mean, model_std = mean_std.get("model", (None, None))
        return RewardScores(scores=scores, parts=parts, model_mean=model_mean, model_std=model_std)

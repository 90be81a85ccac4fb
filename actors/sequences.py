"""Forward passes over (left-padded prompt, right-padded response) sequences, shared by the learner, the
reference and the critic, so every role computes logprobs (and values) of a response the same way.

A micro-batch becomes one forward pass in one of two layouts (`LAYOUTS`), chosen once per role (`choose_layout`):
- padded: rows [b, Tp + T] with the columns that are padding in every row dropped, an attention mask, and
  positions counted over real tokens;
- packed: the real tokens of the b sequences concatenated in one row [1, N], positions restarting at 0 per
  sequence, no attention mask and no cache. transformers then builds the block-diagonal causal mask from the
  positions (masking_utils.find_packed_sequence_indices); given any mask or a cache it does not, and each
  sequence would attend to the ones before it, so `packing_problem` checks the model once before it is used.
Both read the outputs at the positions that predict each response token, so callers see [B, T] either way.

Micro-batch plans (a row count, or a token budget filled longest first) and the rank split that balances tokens
live here too: they need the token cost of a layout.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch

from pipeline.algo import token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def join(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor):
    """-> (input_ids [B, Tp+T], attention_mask [B, Tp+T], position_ids [B, Tp+T]).

    Positions count only real tokens, so left padding does not shift them (vLLM numbers them the same way)."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logits(model: PreTrainedModel, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
    """Logits that predict each response token: [B, T, V] (the logit at position t-1 predicts token t)."""
    input_ids, attention_mask, position_ids = join(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    tp = prompt_ids.shape[1]
    return logits[:, tp - 1 : -1, :]


def response_logprobs(model: PreTrainedModel, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
    """Per-token logprobs of the response tokens under `model`: [B, T] float32, 0 where the mask is False."""
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logprobs = token_logprobs(logits, response_ids)
    return torch.where(response_mask, logprobs, 0.0)


def trim_padding(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor):
    """Drop the columns that are padding in every row (left of the prompts, right of the responses).

    Positions come from the mask (`join`), so the logprobs do not change; a micro-batch of short sequences just
    costs less. Keeps at least one column of each, as response_logits needs."""
    first = int(prompt_mask.any(dim=0).float().argmax()) if prompt_mask.any() else prompt_mask.shape[1] - 1
    used = response_mask.any(dim=0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    return prompt_ids[:, first:], prompt_mask[:, first:], response_ids[:, :width], response_mask[:, :width]


def padded_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
    """Model outputs at the positions that predict the response tokens, from padded rows: [M, C], M = the
    response tokens (response_mask.sum(), in row-major order), C = vocab (LM) or 1 (value head)."""
    prompt_ids, prompt_mask, response_ids, trimmed = trim_padding(prompt_ids, prompt_mask, response_ids, response_mask)
    return response_logits(model, prompt_ids, prompt_mask, response_ids, trimmed)[trimmed]


@dataclass(frozen=True)
class Packed:
    """b sequences as one row: input_ids, position_ids [1, N]; predictors [M]: the index in the row of the
    output that predicts each response token (row-major order of response_mask)."""

    input_ids: Tensor
    position_ids: Tensor
    predictors: Tensor


def pack(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> Packed:
    """Concatenate the real tokens of each sequence (prompt, then response) into one row, positions from 0 per
    sequence. Sequences without response tokens are left out: nothing of theirs is read back.

    prompt_ids, prompt_mask: [B, Tp]; response_ids, response_mask: [B, T]. Token t of a response is predicted
    by the output just before it in the row, so every sequence with a response needs a prompt token."""
    has_response = response_mask.any(dim=1)
    if (has_response & ~prompt_mask.any(dim=1)).any():
        raise ValueError("packed forward: a sequence has response tokens but an empty prompt")
    real = torch.cat([prompt_mask, response_mask], dim=1) & has_response[:, None]  # [B, Tp+T]
    ids = torch.cat([prompt_ids, response_ids], dim=1)[real]  # [N], row-major: sequence by sequence
    positions = (real.long().cumsum(dim=1) - 1)[real]  # 0, 1, ... within each sequence
    where = torch.zeros(real.shape, dtype=torch.long, device=real.device)
    where[real] = torch.arange(len(ids), device=real.device)  # index in the row of each real token
    predictors = where[:, prompt_ids.shape[1] :][response_mask] - 1
    return Packed(ids[None], positions[None], predictors)


def packed_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask, *, keep_logits: bool = False):
    """`padded_outputs` from one packed row: [M, C]. keep_logits: the model takes `logits_to_keep` (HF causal
    LMs), so its head runs on the M predicting positions only instead of all N."""
    if not response_mask.any():  # nothing to read back, but the forward still runs (ZeRO-3 ranks meet in it)
        return padded_outputs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    p = pack(prompt_ids, prompt_mask, response_ids, response_mask)
    extra = {"logits_to_keep": p.predictors} if keep_logits else {}
    # attention_mask=None and use_cache=False: the only way transformers reads the packing from position_ids.
    out = model(input_ids=p.input_ids, position_ids=p.position_ids, attention_mask=None, use_cache=False, **extra)
    return out.logits[0] if keep_logits else out.logits[0, p.predictors]


def scatter(values: Tensor, mask: Tensor) -> Tensor:
    """values [M] (one per True of mask, row-major) -> [B, T] float32, 0 where mask is False; differentiable."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values.float())


def padded_tokens(lengths: Tensor) -> int:
    """Tokens one padded forward computes for sequences of lengths [b, 2] (prompt, response): b rows as wide as
    the longest prompt plus the longest response (trim_padding keeps at least one column of each)."""
    return len(lengths) * (max(int(lengths[:, 0].max()), 1) + max(int(lengths[:, 1].max()), 1))


def packed_tokens(lengths: Tensor) -> int:
    """Tokens one packed forward computes for sequences of lengths [b, 2]: the real tokens of those that have a
    response (`pack` leaves the others out); padded rows when none has one (packed_outputs)."""
    has_response = lengths[:, 1] > 0
    return int(lengths[has_response].sum()) if has_response.any() else padded_tokens(lengths)


@dataclass(frozen=True)
class Layout:
    """How a micro-batch becomes one forward pass. outputs(model, prompt_ids, prompt_mask, response_ids,
    response_mask) -> [M, C] at the predicting positions; tokens(lengths [b, 2]) -> tokens that forward computes."""

    name: str
    outputs: Callable[..., Tensor]
    tokens: Callable[[Tensor], int]

    def logprobs(self, model, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
        """Per-token logprobs of the responses: [B, T] float32, 0 where response_mask is False."""
        logits = self.outputs(model, prompt_ids, prompt_mask, response_ids, response_mask)
        return scatter(token_logprobs(logits, response_ids[response_mask]), response_mask)

    def values(self, model, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
        """A value head's output at the position that predicts each response token: [B, T] float32."""
        out = self.outputs(model, prompt_ids, prompt_mask, response_ids, response_mask)
        return scatter(out[:, 0], response_mask)


LAYOUTS: dict[str, Layout] = {
    "padded": Layout("padded", padded_outputs, padded_tokens),
    "packed": Layout("packed", packed_outputs, packed_tokens),
}


def lengths_of(prompt_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Real (prompt, response) tokens of each sequence: [B, 2] long, on CPU."""
    return torch.stack([prompt_mask.sum(dim=1), response_mask.sum(dim=1)], dim=1).long().cpu()


def probe_batch(vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two sequences for packing_problem: a long one (5 + 11 tokens), then a short one (2 + 3): were the short one
    to attend to the long one, or to take its positions from the row, its outputs would change."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab_size, 1000), (2, 16), generator=g)
    prompt_mask = torch.tensor([[True] * 5, [False] * 3 + [True] * 2])
    response_mask = torch.tensor([[True] * 11, [True] * 3 + [False] * 8])
    batch = (ids[:, :5] * prompt_mask, prompt_mask, ids[:, 5:] * response_mask, response_mask)
    prompt_ids, prompt_mask, response_ids, response_mask = (t.to(device) for t in batch)
    return prompt_ids, prompt_mask, response_ids, response_mask


def packed_layout(module: PreTrainedModel) -> Layout:
    """The packed layout for `module`, its head run on the predicting positions only when it takes
    `logits_to_keep` (read from its forward's signature)."""
    keep = "logits_to_keep" in inspect.signature(module.forward).parameters
    return Layout("packed", partial(packed_outputs, keep_logits=keep), packed_tokens)


def packing_problem(model, module: PreTrainedModel, device: torch.device, packed: Layout) -> str | None:
    """Why `module` (called through `model`, e.g. a DeepSpeed engine) cannot take packed sequences, or None when
    packed outputs equal padded ones on probe_batch (to 1e-4 of their scale in fp32, 2e-2 in 16-bit floats)."""
    batch = probe_batch(module.config.get_text_config().vocab_size, device)
    try:
        with torch.no_grad():
            padded = padded_outputs(model, *batch).float()
            got = packed.outputs(model, *batch).float()
    except (TypeError, ValueError, RuntimeError) as e:
        return f"packed forward failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return outputs_differ(padded, got, module)


def outputs_differ(padded: Tensor, packed: Tensor, module: PreTrainedModel) -> str | None:
    """Why the packed outputs of a probe batch are not the padded ones (beyond 1e-4 of their scale in fp32, 2e-2 in
    16-bit floats), or None when they agree."""
    dtype = next(module.parameters()).dtype
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * (1.0 + padded.abs().max().item())
    diff = (packed - padded).abs().max().item()
    if not diff <= tol:
        attn = getattr(module.config, "_attn_implementation", None)
        return (
            f"packed and padded outputs differ by {diff:.3g} > {tol:.3g} (attn_implementation={attn}): its "
            "attention does not take packed positions"
        )
    return None


def choose_layout(
    model, module: PreTrainedModel, device: torch.device, packing: bool, *, who: str, quiet: bool = False
) -> Layout:
    """The packed layout when `packing` is on and the model passes packing_problem, else the padded one (with one
    log line naming why, unless quiet: e.g. every data-parallel rank but the first)."""
    if not packing:
        return LAYOUTS["padded"]
    packed = packed_layout(module)
    if problem := packing_problem(model, module, device, packed):
        if not quiet:
            log.warning("%s: padded forwards instead of packed: %s %s", who, type(module).__name__, problem)
        return LAYOUTS["padded"]
    return packed


def micro_batches(lengths: Tensor, *, rows: int, max_tokens: int | None, tokens: Callable[[Tensor], int]):
    """A micro-batch plan: index tensors that cover the B sequences once each.

    lengths: [B, 2] real (prompt, response) tokens. max_tokens None: consecutive micro-batches of `rows`
    sequences. Else first-fit decreasing: longest sequence first, each into the first micro-batch whose forward
    stays within max_tokens by `tokens` (a sequence longer than the budget gets a micro-batch of its own)."""
    n = len(lengths)
    if max_tokens is None:
        return [torch.arange(s, min(s + rows, n)) for s in range(0, n, rows)]
    bins: list[list[int]] = []
    for i in torch.argsort(lengths.sum(dim=1), descending=True, stable=True).tolist():
        fit = next((b for b in bins if tokens(lengths[b + [i]]) <= max_tokens), None)
        if fit is None:
            bins.append([i])
        else:
            fit.append(i)
    return [torch.tensor(b, dtype=torch.long) for b in bins]


def split_to(plan: list[Tensor], count: int, lengths: Tensor, tokens: Callable[[Tensor], int]) -> list[Tensor]:
    """The plan with `count` micro-batches: the costliest one of several sequences is halved until there are
    enough (data-parallel ranks must run the same number of forward/backward passes)."""
    plan = list(plan)
    while len(plan) < count:
        splittable = [i for i, idx in enumerate(plan) if len(idx) > 1]
        if not splittable:
            raise ValueError(f"{len(lengths)} sequences cannot fill the {count} micro-batches another rank runs")
        i = max(splittable, key=lambda j: tokens(lengths[plan[j]]))
        idx = plan.pop(i)
        plan[i:i] = [idx[0::2], idx[1::2]]
    return plan


def balanced_shards(lengths: Tensor, world_size: int) -> list[Tensor]:
    """Split B sequences into world_size shards of B / world_size each, with their real tokens as even as
    greedy assignment makes them: longest first, each to the shard with the fewest tokens that has room.

    lengths: [B] tokens per sequence. -> sorted index tensors, one per rank."""
    n = len(lengths)
    if n % world_size:
        raise ValueError(f"batch of {n} sequences does not split into {world_size} equal learner shards")
    size, load = n // world_size, [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in torch.argsort(lengths, descending=True, stable=True).tolist():
        r = min((r for r in range(world_size) if len(shards[r]) < size), key=lambda r: load[r])
        shards[r].append(i)
        load[r] += int(lengths[i])
    return [torch.tensor(sorted(s), dtype=torch.long) for s in shards]


class TokenCounter(Protocol):
    """What counts a forward's tokens: a Layout, or an offline stage's Objective."""

    @property
    def tokens(self) -> Callable[[Tensor], int]: ...


def token_metrics(lengths: Tensor, plan: list[Tensor], layout: TokenCounter, *, passes: int = 1) -> dict[str, float]:
    """`tokens/real`: prompt + response tokens of the sequences (lengths [B, 2]); `tokens/computed`: tokens the
    forward passes of `plan` compute in `layout`, padding included, over `passes` passes."""
    computed = sum(layout.tokens(lengths[idx]) for idx in plan)
    return {"tokens/real": float(lengths.sum()), "tokens/computed": float(passes * computed)}

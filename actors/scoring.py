"""The reward-model input convention (DESIGN.md) and reward-model forwards, shared by the reward role (scoring) and
the offline reward and irl training (actors/training/offline.py), so a model is trained, scored and exported by
one rule.

Two scoring layouts (`SCORE_LAYOUTS`), chosen once per model (`choose_score_layout`), the scoring twins of
actors.sequences' layouts: padded rows, or the real tokens packed into a few rows of at most `ROW_TOKENS` tokens,
positions restarting per sequence, the backbone once and the score head at each sequence's scored token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import BatchEncoding

from actors.sequences import micro_batches, outputs_differ

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor
log = logging.getLogger(__name__)


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


def reward_model_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
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
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, *, row_tokens: int = ROW_TOKENS
) -> Tensor:
    """`reward_model_scores` from packed rows [R, W]: the real tokens of the B sequences concatenated into a few
    rows (packed_rows), positions restarting at 0 per sequence, the rest of a row a filler block of pad ids with
    its own positions; no attention mask and no cache (as actors.sequences.pack, so transformers builds the
    block-diagonal mask). The backbone runs once, the score head on the B scored positions only: [B] float32.

    model: an HF sequence-classification model whose head is a `score` module, as in Llama, Qwen2, Mistral, GPT-2
    and most decoder-only models, or an engine wrapping one as `.module` (DeepSpeed: its own `config` is not the
    model's, so the backbone, head and config are read from the wrapped model)."""
    wrapped = getattr(model, "module", None)
    model = wrapped if isinstance(wrapped, torch.nn.Module) else model
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
    row_of, start = torch.zeros(len(lengths), dtype=torch.long), torch.zeros(len(lengths), dtype=torch.long)
    row_lengths: list[int] = []
    for r, idx in enumerate(packed_rows(lengths, row_tokens)):
        row_of[idx] = r
        start[idx] = lengths[idx].cumsum(0) - lengths[idx]  # each sequence's first column in its row
        row_lengths.append(int(lengths[idx].sum()))
    row_of, start, used = row_of.to(device), start.to(device), torch.tensor(row_lengths, device=device)
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
    scores: Callable[[PreTrainedModel, Tensor, Tensor], Tensor]
    tokens: Callable[[Tensor], int]


SCORE_LAYOUTS: dict[str, ScoreLayout] = {
    "padded": ScoreLayout("padded", reward_model_scores, lambda lengths: len(lengths) * int(lengths.max())),
    "packed": ScoreLayout("packed", packed_reward_scores, packed_row_tokens),
}


def score_lengths(attention_mask: Tensor) -> Tensor:
    """Real tokens of each reward-model row: [B, 1] long on CPU, the lengths micro_batches and ScoreLayout take."""
    return attention_mask.sum(dim=1, keepdim=True).long().cpu()


def score_probe(model: PreTrainedModel, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two left-padded rows for choose_score_layout: a long one (12 tokens) and a short one (4), no pad ids."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(config.get_text_config().vocab_size, 1000), (2, 12), generator=g)
    if config.pad_token_id is not None:
        ids[ids == config.pad_token_id] = (config.pad_token_id + 1) % config.get_text_config().vocab_size
    mask = torch.tensor([[1] * 12, [0] * 8 + [1] * 4])
    return ids.masked_fill(mask == 0, config.pad_token_id or 0).to(device), mask.to(device)


def choose_score_layout(
    model, module: PreTrainedModel, device: torch.device, packing: bool, *, who: str, quiet: bool = False
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

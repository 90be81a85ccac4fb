"""Forward passes over (left-padded prompt, right-padded response) sequences, shared by the learner, the
reference and the critic, so every role computes logprobs of a response the same way."""

from __future__ import annotations

import torch

from pipeline.algo import token_logprobs

Tensor = torch.Tensor


def join(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor):
    """-> (input_ids [B, Tp+T], attention_mask [B, Tp+T], position_ids [B, Tp+T]).

    Positions count only real tokens, so left padding does not shift them (vLLM numbers them the same way)."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logits(model: torch.nn.Module, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
    """Logits that predict each response token: [B, T, V] (the logit at position t-1 predicts token t)."""
    input_ids, attention_mask, position_ids = join(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    tp = prompt_ids.shape[1]
    return logits[:, tp - 1 : -1, :]


def response_logprobs(model: torch.nn.Module, prompt_ids, prompt_mask, response_ids, response_mask) -> Tensor:
    """Per-token logprobs of the response tokens under `model`: [B, T] float32, 0 where the mask is False."""
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logprobs = token_logprobs(logits, response_ids)
    return torch.where(response_mask, logprobs, 0.0)

"""Per-token log-probabilities and entropies from model logits."""

import torch

Tensor = torch.Tensor


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each given token under the logits.

    logits: [B, T, V] (any float dtype; math is done in float32); tokens: [B, T] long, aligned with
    logits (logits[:, t] is the distribution that produced tokens[:, t]). Returns [B, T] float32.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    # log_softmax(x)[k] = x[k] - logsumexp(x): avoids materializing a second [B, T, V] tensor.
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position.

    logits: [B, T, V] (math in float32). Returns [B, T] float32.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    # H = -sum p log p = logsumexp(x) - sum p x; the where keeps -inf logits (banned tokens, p = 0)
    # from turning 0 * -inf into NaN.
    return torch.logsumexp(logits, dim=-1) - (probs * torch.where(probs > 0, logits, 0.0)).sum(dim=-1)

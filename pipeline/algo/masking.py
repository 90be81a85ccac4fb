"""Masked reductions over token tensors.

Every function here reads a value only where the mask is set: masked positions are replaced with 0
through `torch.where` (never multiplied by the mask), so padding that holds inf or NaN cannot leak
into an output or a gradient.
"""

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def bool_mask(mask: Tensor) -> Tensor:
    """Mask of any dtype (bool, or 0/1 float/int) -> bool tensor of the same shape."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is set.

    x: any shape, e.g. [B, T]; mask: broadcastable to x (bool or 0/1); dim: reduce one dim, or all if None.
    """
    zeroed = torch.where(bool_mask(mask), x, 0.0)
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is set; 0 (not NaN) where nothing is set.

    x: any shape, e.g. [B, T]; mask: broadcastable to x; dim: reduce one dim, or all if None.
    """
    m = torch.broadcast_to(bool_mask(mask), x.shape)
    count = m.sum() if dim is None else m.sum(dim)
    # clamp(min=1): an empty selection has sum 0, so its mean is 0 rather than 0/0.
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance (divide by N, no Bessel correction) of `x` over all masked-in positions.

    x: any shape, e.g. [B, T]; mask: broadcastable to x. Returns a scalar; 0 for fewer than 2 positions.
    """
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalize `x` to zero mean and unit variance over all masked-in positions of the whole tensor.

    x: [B, T] (any shape); mask: broadcastable to x. Masked positions are 0 in the output.
    With shift_mean=False the mean is added back, so only the scale changes.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(bool_mask(mask), whitened, 0.0)


def last_valid_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last set position of each row, and whether the row has any.

    mask: [B, T] (leading, trailing or interior zeros allowed). Returns (index [B] long, has_any [B] bool);
    index is 0 for empty rows.
    """
    m = bool_mask(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    last = torch.where(m, positions, -1).amax(dim=-1)
    return last.clamp(min=0), last >= 0


def token_mean(loss: Tensor, mask: Tensor) -> Tensor:
    """Mean over every valid token of the batch (long sequences weigh more). loss, mask: [B, T]."""
    return masked_mean(loss, mask)


def seq_mean_token_sum(loss: Tensor, mask: Tensor) -> Tensor:
    """Sum over tokens of each sequence, then mean over non-empty sequences. loss, mask: [B, T]."""
    return masked_mean(masked_sum(loss, mask, dim=-1), bool_mask(mask).any(dim=-1))


def seq_mean_token_mean(loss: Tensor, mask: Tensor) -> Tensor:
    """Mean over tokens of each sequence, then over non-empty sequences (GRPO, Shao et al. 2024 eq. 3).

    loss, mask: [B, T].
    """
    return masked_mean(masked_mean(loss, mask, dim=-1), bool_mask(mask).any(dim=-1))


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-mean": seq_mean_token_mean,
}


def aggregate_loss(loss: Tensor, mask: Tensor, *, agg: str = "token-mean") -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar with the named rule from LOSS_AGGREGATIONS.

    loss, mask: [B, T]. Empty sequences are left out of the sequence means; an all-empty batch gives 0.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[agg](loss, mask)

"""The policy-gradient objectives: GRPO (token-level ratio) and GSPO (sequence-level ratio), with
DAPO's separate low/high clips and an optional KL penalty to a reference policy.

Shape legend: B sequences (completions), T tokens.

Advantages (group-normalized, DeepSeekMath's GRPO): each prompt's G completions get
A_i = (r_i - mean(r)) / (std(r) + eps), std the sample standard deviation of the group
(unbiased, as TRL's GRPOTrainer); `scale = "none"` keeps r_i - mean(r) (Dr. GRPO).

GRPO, per sampled token t of completion i (mask: the assistant's sampled tokens):
  ratio = exp(logp - old_logp)
  loss_t = -min(ratio A_i, clip(ratio, 1 - clip_low, 1 + clip_high) A_i) + kl_coef kl_t
summed over the masked tokens of the whole batch and divided by their count (DAPO's token-level
normalization: long completions are not down-weighted).
GSPO (Qwen's group sequence policy optimization): one ratio per completion,
  s_i = exp(mean over its tokens of (logp - old_logp)),
  loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i),
averaged over the batch's completions; the KL term stays per token.
KL: Schulman's k3 estimator, kl_t = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "gspo")
ADVANTAGE_SCALES = ("group", "none")


@dataclass(frozen=True)
class Objective:
    loss_type: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """rewards [n * G] (each prompt's G completions in a row) -> advantages [n * G]."""
    r = rewards.view(-1, group_size).double()
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centered = centered / (std + eps)
    return centered.view(-1).to(rewards.dtype)


@dataclass
class LossParts:
    """One micro-batch's contribution: `loss` (already divided by the global normalizer, ready for
    backward) and sums for the step's metrics (divide them by the global counts)."""

    loss: torch.Tensor
    clipped: torch.Tensor  # tokens (GRPO) or completions (GSPO) whose clipped branch was taken
    kl_sum: torch.Tensor  # sum of kl_t over the masked tokens (0 without a reference)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    obj: Objective,
    token_count: torch.Tensor,
    seq_count: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
) -> LossParts:
    """logp, old_logp, ref_logp [B, T] (0 outside the mask is fine), advantages [B], mask [B, T]
    bool; token_count / seq_count: the global number of masked tokens / completions, over every
    micro-batch and data-parallel rank (so the micro-batches' losses add up to the batch's)."""
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    lo, hi = 1 - obj.clip_low, 1 + obj.clip_high
    delta = (logp - old_logp) * m
    if obj.loss_type == "grpo":
        ratio = torch.exp(delta)
        a = adv.unsqueeze(1)
        surr = torch.minimum(ratio * a, ratio.clamp(lo, hi) * a)
        loss = -(surr * m).sum() / token_count
        clipped = (((a > 0) & (ratio > hi)) | ((a < 0) & (ratio < lo))) & mask
    elif obj.loss_type == "gspo":
        lengths = m.sum(dim=1).clamp(min=1)
        s = torch.exp(delta.sum(dim=1) / lengths)  # [B]
        surr = torch.minimum(s * adv, s.clamp(lo, hi) * adv)
        has = mask.any(dim=1)
        loss = -(surr * has).sum() / seq_count
        clipped = (((adv > 0) & (s > hi)) | ((adv < 0) & (s < lo))) & has
    else:
        raise ValueError(f"loss type {obj.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        d = (ref_logp - logp) * m
        kl = (torch.exp(d) - d - 1) * m
        kl_sum = kl.sum()
        if obj.kl_coef:
            loss = loss + obj.kl_coef * kl_sum / token_count
    return LossParts(loss, clipped.sum(), kl_sum.detach())

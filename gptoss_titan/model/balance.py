"""Expert load balancing: the auxiliary-loss-free router bias update (DeepSeek-V3) and the
load-balancing auxiliary loss (Switch / GShard, or Hugging Face's pooled form)."""

from __future__ import annotations

import torch

from .moe import Router


@torch.no_grad()
def update_expert_bias(routers: list[Router], counts: torch.Tensor, rate: float, rule: str = "sign") -> None:
    """Auxiliary-loss-free balancing, after an optimizer step: raise the bias of under-loaded
    experts, lower over-loaded ones (counts [L, E]: the whole global batch's assignments).
    rule "sign": each bias moves by +-rate (DeepSeek-V3's update: the same step however far off);
    "proportional": by rate x (mean - load) / mean, large for a collapsed expert (load E / K
    times the mean: a step of (E / K - 1) x rate) and small near balance (less jitter)."""
    for router, c in zip(routers, counts.float()):
        mean = c.mean()
        error = torch.sign(mean - c) if rule == "sign" else (mean - c) / mean.clamp(min=1.0)
        router.expert_bias += rate * error


def load_balancing_loss(
    counts: torch.Tensor, prob_sums: torch.Tensor, n_rows: int | torch.Tensor, per_layer: bool = False
) -> torch.Tensor:
    """The load-balancing aux loss E x sum_e(f_e x P_e); K under perfectly balanced routing.

    counts [L, E] top-k assignments, prob_sums [L, E] softmax column sums, n_rows tokens per layer;
    f_e = share of the assignments to e (sums to K), P_e = mean router probability of e.
    per_layer=False: Hugging Face's form, f and P pooled over the layers first (layers collapsed
    onto different experts look balanced to it). per_layer=True: the Switch / GShard form, one loss
    per layer, averaged over layers. Data-parallel: pass the counts and n_rows summed over ranks
    with each rank's own prob_sums; the per-rank results then add up to the loss of the whole batch
    (f carries no gradient).
    """
    L, E = counts.shape
    if per_layer:
        f = counts.float() / n_rows  # [L, E]
        p = prob_sums / n_rows  # [L, E]
        return E * (f * p).sum() / L
    f = counts.float().sum(0) / (L * n_rows)  # [E]
    p = prob_sums.sum(0) / (L * n_rows)  # [E]
    return E * (f * p).sum()

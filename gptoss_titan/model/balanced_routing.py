"""Capacity-limited top-k routing: the fallback of `ModelArgs.balanced_routing` (Router).

In the first steps of a from-scratch run every position's hidden state moves toward the same
vector (the model learns the unigram distribution first), so the router's logits differ little
across tokens while their common part drifts faster than a per-expert bias can follow: a plain
top-k then sends every token to the same experts (benchmarks/README.md, "Expert balancing").
No bias can split tokens that nearly agree; an assignment that ranks them can. `balanced_topk`
gives each expert at most its share of the choices, the best-scoring tokens first, so the
smallest differences between tokens decide who goes where (in the spirit of BASE layers'
balanced assignment, greedy instead of an exact auction).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def balanced_topk(scores: torch.Tensor, k: int, rounds: int | None = None) -> torch.Tensor:
    """scores [M, E] -> expert indices [M, k] (distinct per token), each expert holding at most
    ceil(M k / E) of the M x k choices where the greedy rounds manage it.

    Each round, every token short of k choices proposes to as many of its best experts as it
    lacks, among those it has not chosen and that still have room; each expert accepts its
    best-scoring proposals up to its room. A batch routed all alike fills about one expert a
    round once most tokens lack one choice, so the default is E rounds (measured: E / k + 2 leave
    32 experts at 4.5x the mean in such a batch, E reach the capacity); after them a token still
    short (every expert it lacks is full) takes its best missing experts anyway.
    Deterministic, static shapes, no host sync: the same ops on every device, compilable.
    The experts chosen within capacity come first (best first), then any taken past it.
    """
    M, E = scores.shape
    dev = scores.device
    cap = -(-M * k // E)
    low = torch.finfo(scores.dtype).min
    taken = torch.zeros(M, E, dtype=torch.bool, device=dev)
    load = torch.zeros(E, dtype=torch.int64, device=dev)
    position = torch.arange(M * k, device=dev)
    no_room = torch.zeros(1, dtype=torch.int64, device=dev)  # the group of proposals not made
    for _ in range(E if rounds is None else rounds):
        open_ = ~taken & (load < cap)  # [M, E]
        score, expert = scores.masked_fill(~open_, low).topk(k, -1)  # [M, k] each, best first
        need = k - taken.sum(-1, keepdim=True)  # [M, 1]
        made = (torch.arange(k, device=dev) < need) & open_.gather(-1, expert)  # [M, k]
        score, expert, made = score.reshape(-1), expert.reshape(-1), made.reshape(-1)  # [M k]
        # proposals grouped by expert, best score first (two stable sorts); those not made go last
        by_score = torch.argsort(torch.where(made, -score, torch.inf), stable=True)
        group = torch.where(made, expert, E)[by_score]
        by_group = torch.argsort(group, stable=True)
        order, group = by_score[by_group], group[by_group]
        size = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(
            0, group, torch.ones_like(group)
        )
        rank = position - (torch.cumsum(size, 0) - size)[group]  # place in its expert's queue
        accepted_sorted = rank < torch.cat([cap - load, no_room])[group]
        accepted = torch.zeros(M * k, dtype=torch.bool, device=dev).index_copy(0, order, accepted_sorted)
        # the k experts of a row are distinct: a plain scatter, no accumulation
        taken |= torch.zeros_like(taken).scatter_(1, expert.view(M, k), accepted.view(M, k))
        load += torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, expert, accepted.long())
    have = taken.sum(-1, keepdim=True)  # [M, 1] choices made within capacity
    mine = scores.masked_fill(~taken, low).topk(k, -1).indices  # the taken first, best first
    extra = scores.masked_fill(taken, low).topk(k, -1).indices  # the best of the rest
    slot = torch.arange(k, device=dev)[None, :]  # [1, k]
    return torch.where(slot < have, mine, extra.gather(-1, (slot - have).clamp(min=0)))


@torch.no_grad()
def balanced_choice(
    scores: torch.Tensor, idx: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's training choice: the plain top-k idx [M, k] of scores [M, E], or balanced_topk's
    where idx puts more than threshold x the mean load on an expert (decided on the device: no
    host sync); and the tally [E + 1]: idx's loads (what the bias evens out) and 1 if it fell back.
    A recomputing activation checkpoint tallies a batch twice, a uniform scale the bias update
    ignores (it reads signs and ratios to the mean)."""
    E = scores.shape[-1]
    flat = idx.reshape(-1)
    plain = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    over = plain.max() > threshold * flat.numel() / E
    return torch.where(over, balanced_topk(scores, idx.shape[-1]), idx), torch.cat(
        [plain, over.long().view(1)]
    )

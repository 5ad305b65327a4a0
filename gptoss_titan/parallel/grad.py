"""The true global gradient norm over plain, FSDP-sharded and expert-sharded gradients, and clipping."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model.local import local


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, stages_group=None, device=None) -> torch.Tensor:
    """Clip gradients in place to a global L2 norm of max_norm (0 or inf = no clipping); return the
    norm before clipping, as a 0-d fp64 tensor on the gradients' device (no host sync).

    Gradients are grouped by device mesh (dense and expert parameters live on different meshes);
    each group's norm is a DTensor reduction over its shards (replicas counted once), and the
    groups combine as a root sum of squares, so the result equals the one-process norm. Squares
    are summed in fp64. stages_group: the pipeline's ranks, each holding other parameters (their
    sums of squares are added).
    """
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = p.grad
            groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    total_sq = None
    for grads in groups.values():
        # Sums of squares in fp64: in fp32 the norm of the debug flavor's lm_head gradient (12.9M
        # elements, most of them tiny) is 4e-5 off, which would show in every comparison of runs.
        n = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64)))
        if isinstance(n, DTensor):
            n = n.full_tensor()
        total_sq = n.double() ** 2 if total_sq is None else total_sq + n.double() ** 2
    if stages_group is not None:  # device: where a rank without gradients puts its zero
        total_sq = total_sq if total_sq is not None else torch.zeros((), dtype=torch.float64, device=device)
        dist.all_reduce(total_sq, group=stages_group)
    if total_sq is None:
        return torch.zeros((), dtype=torch.float64)
    total = total_sq.sqrt()
    if max_norm and math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # 1 (no change) when the norm is within max_norm
        for grads in groups.values():
            local_grads = [local(g) for g in grads]
            torch._foreach_mul_(local_grads, coef.to(local_grads[0].dtype))
    return total

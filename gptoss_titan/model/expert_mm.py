"""CPU expert matmuls on expert-sorted rows, with each expert's bias inside its GEMM.

`x [R, in]` rows sorted by expert (`counts[e]` rows each) times `w [E, in, out]` plus `b [E, out]`:
one addmm per expert with rows (what `_grouped_mm` does on CPU, one GEMM after the other), so
there is no [R, out] bias gather and no index_put for the bias gradient in the backward (about
50 ms of a 4 x 512-token bench step; the step is 2-5% faster in A/B runs, at 8 and 64 experts).
Custom ops, so torch.compile and activation checkpointing see one opaque op each.

Tried and dropped (measured 2026-11-24, 2 cores): experts split across Python worker threads,
each GEMM on one thread. In isolation 2x faster at 64 experts x 64 rows (forward + both
backward GEMMs 38-40 ms vs 79-81 ms); in the model a net loss, because after each parallel op
the caller's OpenMP worker spins (libgomp's wait policy) on a core the worker threads need.
GOMP_SPINCOUNT=0 reverses that but makes every other op slower.
"""

from __future__ import annotations

import torch


def _rows(counts: torch.Tensor):
    """(expert, first row, end row) for every expert, in order (one host sync for the counts)."""
    r0 = 0
    for e, n_rows in enumerate(counts.tolist()):
        yield e, r0, r0 + n_rows
        r0 += n_rows


@torch.library.custom_op("gptoss_titan::expert_linear", mutates_args=())
def expert_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """x [R, in] sorted by expert, w [E, in, out], b [E, out] or None, counts [E] -> [R, out]."""
    y = x.new_empty(x.shape[0], w.shape[-1])
    for e, r0, r1 in _rows(counts):
        if r1 == r0:
            continue
        if b is None:
            torch.mm(x[r0:r1], w[e], out=y[r0:r1])
        else:
            torch.addmm(b[e], x[r0:r1], w[e], out=y[r0:r1])
    return y


@expert_linear.register_fake
def _(x, w, b, counts):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("gptoss_titan::expert_linear_wgrad", mutates_args=())
def expert_linear_wgrad(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients: dw[e] = x_e^T g_e [E, in, out], db[e] = column sums of g_e [E, out]."""
    E = counts.numel()
    dw = x.new_empty(E, x.shape[1], g.shape[1])
    db = g.new_empty(E, g.shape[1])
    for e, r0, r1 in _rows(counts):
        if r1 > r0:
            torch.mm(x[r0:r1].t(), g[r0:r1], out=dw[e])
            torch.sum(g[r0:r1], dim=0, out=db[e])
        else:  # an expert without rows this step
            dw[e].zero_()
            db[e].zero_()
    return dw, db


@expert_linear_wgrad.register_fake
def _(x, g, counts):
    E = counts.shape[0]
    return x.new_empty(E, x.shape[1], g.shape[1]), g.new_empty(E, g.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, w, b, counts = inputs
    ctx.save_for_backward(x, w, counts)
    ctx.has_bias = b is not None


def _backward(ctx, g):
    x, w, counts = ctx.saved_tensors
    g = g.contiguous()  # e.g. the stride-0 gradient of a .sum()
    dx = expert_linear(g, w.transpose(1, 2), None, counts) if ctx.needs_input_grad[0] else None
    dw = db = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw, db = expert_linear_wgrad(x, g, counts)
    return dx, dw, db if ctx.has_bias else None, None


expert_linear.register_autograd(_backward, setup_context=_setup)

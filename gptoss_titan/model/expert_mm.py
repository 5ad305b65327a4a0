"""CPU expert matmuls on expert-sorted rows, with each expert's bias inside its GEMM.

`x [R, in]` rows sorted by expert (`counts[e]` rows each) times `w [E, in, out]` plus `b [E, out]`:
one addmm per expert with rows (what `_grouped_mm` does on CPU, one GEMM after the other), so
there is no [R, out] bias gather and no index_put for the bias gradient in the backward (about
50 ms of a 4 x 512-token bench step; the step is 2-5% faster in A/B runs, at 8 and 64 experts).
Custom ops, so torch.compile and activation checkpointing see one opaque op each.

With `batched` (the "batched" expert kernel, chosen by `moe.resolve_expert_kernel` for many
experts with few rows each, fp32/fp64, MKL): all GEMMs of one op in one batched BLAS call instead
(blas_batch.py). A loop splits each small GEMM over every thread, which scales badly; the batch
runs whole GEMMs per thread. The bias then starts the output ([R, out] from `repeat_interleave`,
the GEMMs accumulate onto it) and its gradient is one more GEMM per expert (ones[1, n_e] @ g_e) in
the same call. Calls the batch cannot take (no rows, a size-1 matrix dimension, another dtype)
run the loop.

Tried and dropped (measured 2026-11-24, 2 cores): experts split across Python worker threads,
each GEMM on one thread. In isolation 2x faster at 64 experts x 64 rows (forward + both
backward GEMMs 38-40 ms vs 79-81 ms); in the model a net loss, because after each parallel op
the caller's OpenMP worker spins (libgomp's wait policy) on a core the worker threads need.
GOMP_SPINCOUNT=0 reverses that but makes every other op slower.
"""

from __future__ import annotations

import torch

from . import blas_batch
from .blas_batch import Mat


def _batched(asked: bool, x: torch.Tensor, w_dtype: torch.dtype, n_out: int) -> bool:
    """Run this call as one batched BLAS call? Asked for, and BLAS can take it (not for no rows or a
    size-1 matrix dimension, whose strides BLAS may reject: the loop handles those)."""
    return (
        asked
        and x.device.type == "cpu"
        and x.dtype == w_dtype
        and x.shape[0] > 0
        and min(x.shape[1], n_out) > 1
        and blas_batch.available(x.dtype)
    )


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t itself when BLAS can read it (a unit stride in one of the last two dims), else a copy."""
    return t if 1 in t.stride()[-2:] else t.contiguous()


def _mat(t: torch.Tensor, first_rows: torch.Tensor) -> Mat:
    """Row blocks of a 2-D tensor starting at `first_rows` [E]."""
    return Mat(t, first_rows * t.stride(0), t.stride(0), t.stride(1))


def _experts(w: torch.Tensor) -> Mat:
    """The E matrices of w [E, a, b]."""
    return Mat(w, torch.arange(w.shape[0]) * w.stride(0), w.stride(1), w.stride(2))


def _rows(counts: torch.Tensor):
    """(expert, first row, end row) for every expert, in order (one host sync for the counts)."""
    r0 = 0
    for e, n_rows in enumerate(counts.tolist()):
        yield e, r0, r0 + n_rows
        r0 += n_rows


@torch.library.custom_op("gptoss_titan::expert_linear", mutates_args=())
def expert_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, counts: torch.Tensor, batched: bool
) -> torch.Tensor:
    """x [R, in] sorted by expert, w [E, in, out], b [E, out] or None, counts [E] -> [R, out]."""
    if _batched(batched, x, w.dtype, w.shape[-1]):
        x, w = _strided(x), _strided(w)
        # y starts as each row's bias and the GEMMs accumulate onto it; without a bias it is only written
        y = (
            x.new_empty(x.shape[0], w.shape[-1])
            if b is None
            else torch.repeat_interleave(b, counts, dim=0, output_size=x.shape[0])
        )
        first = torch.cumsum(counts, 0) - counts
        blas_batch.gemm_batch(
            [(counts, w.shape[2], w.shape[1], _mat(x, first), _experts(w), _mat(y, first))],
            beta=0.0 if b is None else 1.0,
        )
        return y
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
def _(x, w, b, counts, batched):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("gptoss_titan::expert_linear_wgrad", mutates_args=())
def expert_linear_wgrad(
    x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, batched: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients: dw[e] = x_e^T g_e [E, in, out], db[e] = column sums of g_e [E, out]."""
    E = counts.numel()
    dw = x.new_empty(E, x.shape[1], g.shape[1])
    db = g.new_empty(E, g.shape[1])
    if _batched(batched, x, g.dtype, g.shape[1]):
        x, g = _strided(x), _strided(g)
        first = torch.cumsum(counts, 0) - counts
        ones = x.new_ones(1, x.shape[0])  # db[e] = ones[1, n_e] @ g_e
        x_t = Mat(x, first * x.stride(0), x.stride(1), x.stride(0))  # x_e^T [in, n_e]
        blas_batch.gemm_batch(
            [
                (x.shape[1], g.shape[1], counts, x_t, _mat(g, first), _experts(dw)),
                (
                    1,
                    g.shape[1],
                    counts,
                    Mat(ones, torch.zeros(E, dtype=torch.int64), ones.shape[1], 1),
                    _mat(g, first),
                    _experts(db.unsqueeze(1)),
                ),
            ]
        )
        return dw, db
    for e, r0, r1 in _rows(counts):
        if r1 > r0:
            torch.mm(x[r0:r1].t(), g[r0:r1], out=dw[e])
            torch.sum(g[r0:r1], dim=0, out=db[e])
        else:  # an expert without rows this step
            dw[e].zero_()
            db[e].zero_()
    return dw, db


@expert_linear_wgrad.register_fake
def _(x, g, counts, batched):
    E = counts.shape[0]
    return x.new_empty(E, x.shape[1], g.shape[1]), g.new_empty(E, g.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, w, b, counts, batched = inputs
    ctx.save_for_backward(x, w, counts)
    ctx.has_bias, ctx.batched = b is not None, batched


def _backward(ctx, g):
    x, w, counts = ctx.saved_tensors
    g = g.contiguous()  # e.g. the stride-0 gradient of a .sum()
    dx = expert_linear(g, w.transpose(1, 2), None, counts, ctx.batched) if ctx.needs_input_grad[0] else None
    dw = db = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw, db = expert_linear_wgrad(x, g, counts, ctx.batched)
    return dx, dw, db if ctx.has_bias else None, None, None


expert_linear.register_autograd(_backward, setup_context=_setup)

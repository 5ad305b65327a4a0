"""One batched BLAS call for many GEMMs of different sizes (model/blas_batch.py) and its use for experts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptoss_titan.model import FLAVORS, blas_batch
from gptoss_titan.model.blas_batch import Mat, gemm_batch

from ..helpers.cpu import MKL_EXPECTED


def test_available_where_pytorch_links_mkl():
    """On x86-64 Linux (CI, and most users) PyTorch links MKL: the batched path must not silently vanish."""
    if not MKL_EXPECTED:
        pytest.skip("this PyTorch build has no MKL: the experts keep their loop of GEMMs")
    assert blas_batch.available(torch.float32) and blas_batch.available(torch.float64)
    assert not blas_batch.available(torch.bfloat16)  # no batched bf16 GEMM: the loop


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_batch_equals_mm(dtype):
    """Groups of different m and k, a transposed operand on each side, an empty k (C must become
    zeros even though it held NaN), beta 0 and 1, two sets in one call."""
    if not blas_batch.available(dtype):
        pytest.skip("no batched BLAS in this PyTorch build")
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([5, 0, 3, 7])  # row blocks of x, one per matrix; one empty
    first = torch.cumsum(rows, 0) - rows
    x = torch.randn(15, 6, generator=g, dtype=dtype)
    w = torch.randn(4, 9, 6, generator=g, dtype=dtype)  # stored [out, in]: used transposed
    y = torch.full((15, 9), float("nan"), dtype=dtype)
    dw = torch.full((4, 6, 9), float("nan"), dtype=dtype)
    gy = torch.randn(15, 9, generator=g, dtype=dtype)
    experts = torch.arange(4) * w.stride(0)
    gemm_batch([(rows, 9, 6, Mat(x, first * 6, 6, 1), Mat(w, experts, 1, 6), Mat(y, first * 9, 9, 1))])
    gemm_batch([(6, 9, rows, Mat(x, first * 6, 1, 6), Mat(gy, first * 9, 9, 1), Mat(dw, experts, 9, 1))])
    acc = torch.randn(4, 6, generator=g, dtype=dtype)
    want_acc = acc + torch.stack([x[0] * e for e in range(1, 5)])
    ones = torch.arange(1, 5, dtype=dtype)  # acc[e] += (e + 1) * x[0]: m = 1, k = 1
    gemm_batch(
        [
            (
                1,
                6,
                1,
                Mat(ones, torch.arange(4), 1, 1),
                Mat(x, torch.zeros(4, dtype=torch.int64), 6, 1),
                Mat(acc, torch.arange(4) * 6, 6, 1),
            )
        ],
        beta=1.0,
    )
    for e, (r0, n) in enumerate(zip(first.tolist(), rows.tolist())):
        torch.testing.assert_close(y[r0 : r0 + n], x[r0 : r0 + n] @ w[e].t())
        torch.testing.assert_close(dw[e], x[r0 : r0 + n].t() @ gy[r0 : r0 + n])
    assert dw[1].eq(0).all()  # k = 0 with beta = 0: zeros, not the NaN that was there
    torch.testing.assert_close(acc, want_acc)


def test_bad_operands_are_refused():
    if not blas_batch.available(torch.float32):
        pytest.skip("no batched BLAS in this PyTorch build")
    x = torch.randn(4, 4)
    off = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="one unit stride"):
        gemm_batch([(2, 2, 2, Mat(x, off, 2, 2), Mat(x, off, 4, 1), Mat(x, off, 4, 1))])
    with pytest.raises(ValueError, match="CPU torch.float32"):
        gemm_batch([(2, 2, 2, Mat(x, off, 4, 1), Mat(x.double(), off, 4, 1), Mat(x, off, 4, 1))])


def test_auto_kernel_batches_many_small_experts():
    """The bench shape that needs it (64 experts x ~64 rows) takes the batched call; 8 x ~512 keeps
    the loop; and the whole MoE layer gives the same output and gradients either way."""
    from gptoss_titan.model.moe import MoE, resolve_expert_kernel

    if not MKL_EXPECTED:
        pytest.skip("this PyTorch build has no MKL")
    assert blas_batch.worth_batching(64, 64 * 64) and not blas_batch.worth_batching(8, 8 * 512)
    assert resolve_expert_kernel("auto", "cpu", torch.float32, 64, 4096)[0] == "batched"
    args = dataclasses.replace(FLAVORS["debug"], dim=32, moe_inter_dim=16, num_experts=32, top_k=4)
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    h = torch.randn(2, 50, args.dim)
    results = []
    for kernel in ("loop", "batched"):
        moe.experts.kernel = kernel
        out, counts, _ = moe(h)
        grads = torch.autograd.grad(out.square().sum(), list(moe.parameters()))
        results.append((out, grads))
    assert counts.eq(0).any() or counts.min() < counts.max()  # uneven routing, as in training
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)

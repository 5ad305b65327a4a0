"""Many small GEMMs of different sizes in one BLAS call: MKL's `cblas_?gemm_batch` (group API).

PyTorch's x86 CPU builds link MKL into libtorch_cpu and export the batch entry points. One call
with one group per expert lets MKL spread the experts over the intra-op threads, one GEMM per
thread at a time, instead of splitting every small GEMM across all threads (which is what a loop
of `torch.mm` does). Measured 2026-11-24 on 2 cores, 64 experts x ~64 rows of a 256 -> 512
matrix with uneven routing, forward + both backward GEMMs: 35 ms vs 50 ms for the loop; at 8
experts x ~512 rows the loop is as fast or faster (27 vs 29 ms), so the "auto" expert kernel
chooses by rows per expert (`worth_batching`, in moe.resolve_expert_kernel); the config's
`model.expert_kernel` can force either.

Where the library has no such symbol (ARM, macOS, other BLAS) or the dtype is not fp32/fp64,
`available()` is False and callers keep their loop.
The interface is MKL's LP64 one (32-bit ints), the one PyTorch links; a probe at first use
checks the results against torch.mm and disables the path if they differ.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import NamedTuple

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOL = {torch.float32: "cblas_sgemm_batch", torch.float64: "cblas_dgemm_batch"}
_MIN_EXPERTS, _MAX_MEAN_ROWS = 16, 256  # batching pays off for many experts with few rows each


class Mat(NamedTuple):
    """Matrix i of a set: tensor t at element offset off[i] (int64 [G]), row stride rs, column stride cs."""

    t: torch.Tensor
    off: torch.Tensor
    rs: int
    cs: int


@functools.cache
def _function(dtype: torch.dtype):
    if dtype not in _SYMBOL:
        return None
    if not sys.platform.startswith("linux") or not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = getattr(lib, _SYMBOL[dtype])
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


def available(dtype: torch.dtype) -> bool:
    """True when one batched BLAS call can run GEMMs of this dtype here (and it passed the probe)."""
    return _function(dtype) is not None and _probe(dtype)


def worth_batching(n_experts: int, n_rows: int) -> bool:
    """Many experts with few rows each: there the batch beats a loop of multithreaded GEMMs."""
    return n_experts >= _MIN_EXPERTS and n_rows < _MAX_MEAN_ROWS * n_experts


def _layout(m: Mat) -> tuple[int, int]:
    """(transpose flag, leading dimension) of a row-major BLAS operand with these strides."""
    if m.cs == 1:
        return _NO_TRANS, max(m.rs, 1)
    if m.rs == 1:
        return _TRANS, max(m.cs, 1)
    raise ValueError(f"a BLAS operand needs one unit stride, got strides ({m.rs}, {m.cs})")


def gemm_batch(
    sets: list[tuple[int | torch.Tensor, int, int | torch.Tensor, Mat, Mat, Mat]], beta: float = 0.0
) -> None:
    """For every set (m, n, k, A, B, C) and every i < G (G = len(A.off)): C_i = A_i @ B_i + beta C_i.

    A_i is m_i x k_i, B_i is k_i x n, C_i is m_i x n (m and k: an int or an int tensor [G]); all
    tensors on the CPU in one dtype. With beta = 0, C is only written (an empty k gives zeros).
    """
    dtype = sets[0][3].t.dtype
    cols: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("ta", "tb", "m", "n", "k", "a", "lda", "b", "ldb", "c", "ldc")
    }
    for m, n, k, a, b, c in sets:
        full = functools.partial(torch.full, (a.off.numel(),), dtype=torch.int64)
        (ta, lda), (tb, ldb), (tc, ldc) = _layout(a), _layout(b), _layout(c)
        if tc != _NO_TRANS:
            raise ValueError("the output of a batched GEMM must be row-major")
        for key, val in (
            ("m", m),
            ("k", k),
            ("n", n),
            ("ta", ta),
            ("tb", tb),
            ("lda", lda),
            ("ldb", ldb),
            ("ldc", ldc),
        ):
            cols[key].append(val.to(torch.int64) if isinstance(val, torch.Tensor) else full(val))
        for key, mat in (("a", a), ("b", b), ("c", c)):
            if mat.t.dtype != dtype or mat.t.device.type != "cpu":
                raise ValueError(
                    f"batched GEMM operands must be CPU {dtype}, got {mat.t.device} {mat.t.dtype}"
                )
            cols[key].append(mat.off * mat.t.element_size() + mat.t.data_ptr())
    ints = {
        key: torch.cat(cols[key]).to(torch.int32) for key in ("ta", "tb", "m", "n", "k", "lda", "ldb", "ldc")
    }
    ptrs = {key: torch.cat(cols[key]) for key in ("a", "b", "c")}
    G = ptrs["a"].numel()
    group_size, alpha, betas = (
        torch.ones(G, dtype=torch.int32),
        torch.ones(G, dtype=dtype),
        torch.full((G,), beta, dtype=dtype),
    )
    p = ctypes.c_void_p
    _function(dtype)(
        ctypes.c_int(_ROW_MAJOR),
        p(ints["ta"].data_ptr()),
        p(ints["tb"].data_ptr()),
        p(ints["m"].data_ptr()),
        p(ints["n"].data_ptr()),
        p(ints["k"].data_ptr()),
        p(alpha.data_ptr()),
        p(ptrs["a"].data_ptr()),
        p(ints["lda"].data_ptr()),
        p(ptrs["b"].data_ptr()),
        p(ints["ldb"].data_ptr()),
        p(betas.data_ptr()),
        p(ptrs["c"].data_ptr()),
        p(ints["ldc"].data_ptr()),
        ctypes.c_int(G),
        p(group_size.data_ptr()),
    )


@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    """Two GEMMs of different shapes, one transposed operand, one accumulate: equal to torch.mm?"""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=dtype)
    b = torch.randn(2, 5, 3, generator=g, dtype=dtype)
    c = torch.randn(7, 3, generator=g, dtype=dtype)
    want = c + torch.cat([a[:4] @ b[0], a[4:] @ b[1]])
    m = torch.tensor([4, 3])
    gemm_batch(
        [
            (
                m,
                3,
                5,
                Mat(a, torch.tensor([0, 20]), 5, 1),
                Mat(b.transpose(1, 2).contiguous(), torch.tensor([0, 15]), 1, 5),
                Mat(c, torch.tensor([0, 12]), 3, 1),
            )
        ],
        beta=1.0,
    )
    return bool(torch.allclose(c, want))

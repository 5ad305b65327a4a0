"""The CPU expert GEMM op (expert_mm.py): registration for compile, inference mode, no rows."""

import pytest
import torch

from gptoss_titan.model.expert_mm import _batched, expert_linear, expert_linear_wgrad

from ..helpers.cpu import MKL_EXPECTED


@pytest.mark.parametrize("batched", [False, True], ids=["gemm_loop", "blas_batch"])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_linear_custom_op_registration(bias, batched):
    """Fake kernels, autograd registration and schema agree with the real ops (torch.compile needs them)."""

    torch.manual_seed(0)
    counts = torch.tensor([4, 0, 7, 5])
    x, g = torch.randn(16, 12, requires_grad=True), torch.randn(16, 6)
    w = torch.randn(4, 12, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True) if bias else None
    torch.library.opcheck(expert_linear, (x, w, b, counts, batched))
    torch.library.opcheck(expert_linear_wgrad, (x.detach(), g, counts, batched))
    with torch.inference_mode():  # generation runs the op in inference mode
        y = expert_linear(x, w, b, counts, batched)
    torch.testing.assert_close(y, expert_linear(x, w, b, counts, batched).detach())


@pytest.mark.parametrize("batched", [False, True])
def test_expert_op_without_rows(batched):
    """An expert-parallel rank can receive no tokens: output [0, out], zero weight and bias grads."""
    counts = torch.zeros(32, dtype=torch.int64)
    x = torch.randn(0, 8, requires_grad=True)
    w, b = torch.randn(32, 8, 4, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    y = expert_linear(x, w, b, counts, batched)
    y.sum().backward()
    assert y.shape == (0, 4) and x.grad.shape == (0, 8)
    assert w.grad.eq(0).all() and b.grad.eq(0).all()


def test_batched_calls_fall_back_to_the_loop_where_blas_cannot_take_them():
    """Asked to batch, the op still loops for no rows, a size-1 dimension or bf16."""
    if not MKL_EXPECTED:
        pytest.skip("this PyTorch build has no MKL")
    x = torch.randn(4096, 8)
    assert _batched(True, x, torch.float32, 16) and not _batched(False, x, torch.float32, 16)
    assert not _batched(True, x.bfloat16(), torch.bfloat16, 16)
    assert not _batched(True, x[:0], torch.float32, 16) and not _batched(True, x, torch.float32, 1)

"""The fused lm_head + cross-entropy (loss.py)."""

import pytest
import torch

from gptoss_titan.model.loss import IGNORE_INDEX, fused_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1 << 6, 1 << 10, 1 << 25])
def test_fused_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 100, (37,))
    t[5] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(h, w, t, chunk)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    (2.5 * loss).backward()
    gh, gw = torch.autograd.grad(2.5 * ref, [h, w])
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_accelerator_path_in_bf16_with_ignored_rows():
    """The GPU branch (bf16 GEMMs, fp32 logits and accumulation, large chunks), forced here on the
    CPU: close to the fp32 reference, and ignored rows get exactly zero gradient."""
    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    t[[3, 17, 49]] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum", ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(ref, [h, w])
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    for chunk in (None, 300 * 7):  # one chunk, and several
        loss = fused_linear_cross_entropy(hb, wb, t, chunk, path="accel")
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref.detach(), rtol=2e-2, atol=0.5)
        ghb, gwb = torch.autograd.grad(loss, [hb, wb])
        assert ghb.dtype == wb.dtype == torch.bfloat16
        assert ghb[[3, 17, 49]].eq(0).all()
        torch.testing.assert_close(ghb.float(), gh, rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(gwb.float(), gw, rtol=5e-2, atol=5e-2)


def test_paths_by_device():
    from gptoss_titan.model.loss import ACCEL_CHUNK_ELEMS, CPU_CHUNK_ELEMS, loss_path

    assert loss_path(torch.device("cpu")) == "cpu" and loss_path(torch.device("cuda")) == "accel"
    assert (
        ACCEL_CHUNK_ELEMS // 201088 >= 1024 and CPU_CHUNK_ELEMS // 201088 < 256
    )  # rows per chunk, 20b vocab


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_accelerator_path_on_cuda_matches_fp32():
    """On CUDA the loss runs bf16 GEMMs with fp32 outputs (`out_dtype`): logits, loss and both
    gradients stay within bf16 rounding of the fp32 reference at the real vocabulary."""
    torch.manual_seed(0)
    h = torch.randn(3000, 256, device="cuda") * 0.5
    w = torch.randn(201088, 256, device="cuda") * 0.02
    t = torch.randint(0, 201088, (3000,), device="cuda")
    t[::7] = IGNORE_INDEX
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hr @ wr.T, t, reduction="sum", ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(ref, [hr, wr])
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(hb, wb, t)
    torch.testing.assert_close(loss, ref.detach(), rtol=5e-3, atol=1.0)
    ghb, gwb = torch.autograd.grad(loss, [hb, wb])
    torch.testing.assert_close(ghb.float(), gh, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gwb.float(), gw, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("path", ["cpu", "accel"])
def test_no_gradient_work_under_no_grad(path):
    """Validation runs the loss under torch.no_grad with inputs that require gradients (autograd's
    needs_input_grad stays True there): one GEMM per chunk, no gradient GEMMs or buffers; with
    gradients on, three per chunk. The loss is the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.mm += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 8, generator=g, requires_grad=True)
    w = torch.randn(32, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 32, (12,), generator=g)
    counts, losses = [], []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), CountMM() as c:
            losses.append(fused_linear_cross_entropy(h, w, t, chunk_elems=4 * 32, path=path))
        counts.append(c.mm)
    assert counts == [3, 9]  # 3 chunks of 4 rows
    assert torch.equal(losses[0], losses[1].detach())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loss_weight_gradient_accumulates_in_place_on_cuda():
    """The lm_head gradient accumulates with addmm(out_dtype=fp32) into itself: no fp32 [V, H]
    product per chunk (2.3 GB at 20b). The probe that picks it must say yes on a GPU, and the
    in-place result equal the copying one."""
    from gptoss_titan.runtime.compat import addmm_fp32_, inplace_addmm_fp32_works

    assert inplace_addmm_fp32_works(torch.device("cuda"), torch.bfloat16)
    a = torch.randn(512, 300, device="cuda").bfloat16()
    b = torch.randn(300, 256, device="cuda").bfloat16()
    acc = torch.randn(512, 256, device="cuda")
    want = acc + torch.mm(a, b, out_dtype=torch.float32)
    addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_counted_rows_on_cuda_need_no_sync():
    """The loss on the counted rows alone (`rows`, found on the host and copied pinned and
    asynchronously as train/batching.py does) under CUDA's sync debug mode: no synchronizing call,
    and the loss and gradients of the full computation (bf16 GEMMs: equal up to their rounding)."""
    from gptoss_titan.model.local import to_device

    torch.manual_seed(0)
    h = (torch.randn(2048, 256, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(201088, 256, device="cuda") * 0.02).bfloat16().requires_grad_()
    t_host = torch.randint(0, 201088, (2048,))
    t_host[: 2048 * 7 // 8] = IGNORE_INDEX  # a chat batch: the prompts ignored
    t = t_host.cuda()
    full = fused_linear_cross_entropy(h, w, t)
    g_full = torch.autograd.grad(full, [h, w])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = to_device(torch.from_numpy((t_host != IGNORE_INDEX).numpy().nonzero()[0]), "cuda")
        part = fused_linear_cross_entropy(h, w, t, rows=rows)
        g_part = torch.autograd.grad(part, [h, w])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(part, full, rtol=1e-3, atol=0)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)
    assert bool((g_part[0][: 2048 * 7 // 8] == 0).all())  # ignored rows: no gradient

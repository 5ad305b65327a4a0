"""The ring's pair kernels (parallel/ring_blocks.py). The whole ring with each kernel is checked
against the definition on 2 and 4 gloo ranks in ring_job.py; here: the mask classification that
must not read the device, the ring op on one rank, and on a GPU the flex kernel against the math
kernel in forward and backward (CPU flex has no backward), its memory following the piece length,
and the whole ring op compiled on NCCL with flex pairs."""

import pytest
import torch
import torch.distributed as dist

from gptoss_titan.parallel import ring_blocks
from gptoss_titan.parallel.ring_blocks import DeviceMask, device_pair_mask

from ..helpers.groups import one_rank_group


def test_device_pair_mask_reads_only_ranges():
    """On a meta tensor any read of the ids' values fails: the flex / math masks only slice them."""
    ids = torch.empty(2, 12, dtype=torch.long, device="meta")
    assert device_pair_mask((0, 4), (8, 12), ids) == "skip"
    m = device_pair_mask((8, 12), (0, 4), ids)
    assert not m.diag and m.q_ids.shape == (2, 4) and m.k_ids.shape == (2, 4)
    assert device_pair_mask((4, 8), (4, 8), None) == DeviceMask(True, None, None)
    with pytest.raises(ValueError, match="overlap"):
        device_pair_mask((4, 8), (2, 6), None)


def _pair(L: int, dtype, device, docs: bool, diag: bool):
    g = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(2, 8, L, 64, generator=g, dtype=dtype, device=device)
    k = torch.randn(2, 2, L, 64, generator=g, dtype=dtype, device=device)
    v = torch.randn(2, 2, L, 64, generator=g, dtype=dtype, device=device)
    go = torch.randn(q.shape, generator=g, dtype=dtype, device=device)
    ids_q = ids_k = None
    if docs:  # batch row 0: the queries' first document is not among the keys (rows with no key)
        ids_q = torch.stack([torch.arange(L) * 3 // L + 1, torch.arange(L) * 2 // L]).to(device)
        ids_k = (
            ids_q if diag else torch.stack([torch.arange(L) * 3 // L + 2, torch.zeros(L, dtype=torch.long)])
        )
        ids_k = ids_k.to(device)
    return q, k, v, go, DeviceMask(diag, ids_q, ids_k)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_pair_equals_math_pair_on_cuda(dtype):
    """Forward (o, l) and the recomputing backward of compiled flex equal the math kernel's; rows that
    see no key give l = -inf, o = 0 and no NaN in any gradient."""
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for docs, diag in ((False, True), (False, False), (True, True), (True, False)):
        q, k, v, go, m = _pair(320, dtype, "cuda", docs, diag)
        res = {}
        for kind in ("flex", "math"):
            with torch.no_grad():
                o, lse = ring_blocks.FORWARD[kind](q, k, v, m, 0.125)
            d_final = (go.float() * o.float()).sum(-1)
            grads = ring_blocks.recompute_backward(kind, go, q, k, v, lse.float(), d_final, m, 0.125)
            res[kind] = (o, lse, *grads)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), res["flex"], res["math"]):
            assert torch.equal(a.isinf(), b.isinf()), (docs, diag, name)
            fin = a.isfinite() & b.isfinite()
            assert fin.sum() == a.isfinite().sum(), (docs, diag, name, "NaN")
            err = ((a.float() - b.float())[fin].abs().max() / b.float()[fin].abs().max().clamp_min(1)).item()
            assert err < tol, (docs, diag, name, err)
        if docs and not diag:
            assert res["flex"][1][0].isinf().any(), "the case must have rows without keys"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_flex_pair_memory_follows_the_piece_length():
    """Peak memory of a document pair's forward + backward grows ~2x when the pieces double (the
    math kernel's scores: 4x)."""
    peaks = []
    for L in (2048, 4096):
        q, k, v, go, m = _pair(L, torch.bfloat16, "cuda", True, False)
        for _ in range(2):  # the first call compiles
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                o, lse = ring_blocks.flex_forward(q, k, v, m, 0.125)
            d_final = (go.float() * o.float()).sum(-1)
            ring_blocks.recompute_backward("flex", go, q, k, v, lse, d_final, m, 0.125)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        peaks.append(peak)
    assert peaks[1] < 3 * peaks[0], peaks


def _one_rank_ring(device: str, backend: str, dtype, compiled: bool) -> dict:
    """The whole ring op on a process group of one rank (cp 1 still cuts the sequence into two
    pieces: causal, cross and document pairs), forward and backward, against the definition in
    fp64; relative max errors."""
    from gptoss_titan.model.attention import sink_attention
    from gptoss_titan.parallel.context_parallel import CPBatch, CPLayout

    with one_rank_group(backend):
        g = torch.Generator().manual_seed(5)
        B, N, G, T, D = 2, 4, 2, 64, 16
        ids = torch.zeros(B, T, dtype=torch.long)
        ids[0, 20:] = 1
        ids[0, 45:] = 2  # batch row 0: three documents, one across the two pieces
        x64 = [torch.randn(B, n, T, D, generator=g, dtype=torch.float64) for n in (N, G, G)]
        x64.append(torch.randn(N, generator=g, dtype=torch.float64))
        grad = torch.randn(B, N, T, D, generator=g, dtype=torch.float64)
        pos = torch.arange(T)
        allowed = (pos[None, :] <= pos[:, None]) & (ids[:, :, None] == ids[:, None, :])
        xs = [t.clone().requires_grad_() for t in x64]
        ref = torch.cat(
            [sink_attention(*(t[b : b + 1] for t in xs[:3]), xs[3], None, allowed[b]) for b in range(B)]
        )
        ref = [ref, *torch.autograd.grad(ref, xs, grad)]
        layout = CPLayout.balanced(T, 1)
        batch = CPBatch(
            layout.index(0).expand(B, -1).to(device), ids.to(device), layout, 0, dist.group.WORLD.group_name
        )
        fn = torch.compile(batch.attend, fullgraph=False) if compiled else batch.attend
        ys = [t.to(device, dtype).requires_grad_() for t in x64]
        out = fn(*ys, None)
        got = [out, *torch.autograd.grad(out, ys, grad.to(device, dtype))]
        return {
            name: ((a.double().cpu() - r).abs().max() / r.abs().max()).item()
            for name, a, r in zip(("out", "dq", "dk", "dv", "dsink"), got, ref)
        }


@pytest.mark.parametrize("kind", ["cpu", "math"])
def test_one_rank_ring_equals_the_definition(kind, monkeypatch):
    """Ring size 1: no exchange, the own keys' gradient complete after the one step."""
    monkeypatch.setattr(ring_blocks, "block_kernel", lambda t: kind)
    errs = _one_rank_ring("cpu", "gloo", torch.float64, compiled=False)
    assert max(errs.values()) < 1e-12, errs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_ring_with_flex_pairs_on_cuda():
    """The ring op inside a compiled function on CUDA (NCCL, one rank): flex pairs in forward, their
    compiled recompute inside the backward op, document block masks from the device."""
    errs = _one_rank_ring("cuda", "nccl", torch.float32, compiled=True)
    assert max(errs.values()) < 5e-3, errs  # fp32 inputs; flex may use TF32 GEMMs

"""The mixture of experts (moe.py): routing, the expert kernels, the combine, kernel choice."""

import pytest
import torch

from gptoss_titan.model import blas_batch
from gptoss_titan.model.balance import load_balancing_loss
from gptoss_titan.model.moe import (
    MoE,
    _grouped_linear,
    _loop_linear,
    clamped_swiglu,
    grouped_mm_works,
    resolve_expert_kernel,
)

from ..conftest import build, tiny_args


def normal_init(module, std):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop straight from the definition."""
    e = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ moe.router.gate.weight.T + moe.router.gate.bias
        top, idx = torch.topk(logits, moe.router.top_k)
        w = torch.softmax(top, -1)
        for wk, ek in zip(w, idx):
            u = x[t] @ e.w_gate_up[ek] + e.b_gate_up[ek]
            gate, up = u[0::2].clamp(max=7.0), u[1::2].clamp(-7.0, 7.0)
            z = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            out[t] += wk * (z @ e.w_down[ek] + e.b_down[ek])
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_per_token_loop(top_k):
    args = tiny_args(num_experts=6, top_k=top_k)
    torch.manual_seed(1)
    moe = MoE(args)
    normal_init(moe, 0.3)  # large weights so the clamps at +-7 are exercised
    x = torch.randn(2, 9, args.dim)
    out, counts, _ = moe(x)
    ref = naive_moe(moe, x.reshape(-1, args.dim)).reshape_as(out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts.sum() == 18 * top_k


def test_expert_counts_sum_to_k_per_token_in_every_layer():
    """Every token is routed to exactly K experts in each layer: the counts the metrics and the
    balancing use sum to K x tokens per layer."""
    args = tiny_args(n_layers=3, num_experts=6, top_k=3)
    m = build(args)
    tok = torch.randint(0, args.vocab_size, (2, 11))
    _, _, counts = m(tok, tok)
    assert counts.shape == (3, 6) and counts.sum(1).tolist() == [2 * 11 * 3] * 3
    assert counts.dtype == torch.int64 and (counts >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_kernels_agree(dtype):
    """Every kernel - the CPU op with its loop of GEMMs and with one batched BLAS call, the grouped
    matmul, the plain loop of other devices - equals a per-row reference, forward and backward
    (x, w and bias), with an expert that gets no rows (its weight and bias gradients are zero)."""
    with torch.no_grad():  # the probe must not depend on the caller's grad mode
        assert grouped_mm_works("cpu", torch.float32), "torch._grouped_mm should work on CPU in torch >= 2.9"
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])  # includes an empty expert
    x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([x[r] @ w[expert[r]] + b[expert[r]] for r in range(10)])
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, w, b], g)
    kernels = {
        "loop": lambda: _grouped_linear(x, w, b, counts, "loop"),
        "plain loop": lambda: _loop_linear(x, w, b, counts),
    }
    if blas_batch.available(dtype):
        kernels["batched"] = lambda: _grouped_linear(x, w, b, counts, "batched")
    if dtype == torch.float32:
        kernels["grouped"] = lambda: _grouped_linear(x, w, b, counts, "grouped")
    for kernel, fn in kernels.items():
        out = fn()
        torch.testing.assert_close(out, ref, msg=kernel)
        got = torch.autograd.grad(out, [x, w, b], g)
        for name, p, q in zip("xwb", got, want):
            torch.testing.assert_close(p, q, msg=f"{kernel} d{name}")
        assert got[1][1].eq(0).all() and got[2][1].eq(0).all()


def test_moe_layer_equal_with_every_kernel():
    """The whole layer (router, sort, experts, combine) gives the same output and gradients with
    each kernel that runs here."""
    args = tiny_args(num_experts=6, top_k=2)
    torch.manual_seed(3)
    moe = MoE(args)
    normal_init(moe, 0.2)
    x = torch.randn(2, 9, args.dim)
    kernels = ["loop", "grouped"] + (["batched"] if blas_batch.available(torch.float32) else [])
    results = {}
    for k in kernels:
        moe.experts.kernel = k
        out, counts, _ = moe(x)
        results[k] = (out, torch.autograd.grad(out.square().sum(), list(moe.parameters())))
    for k in kernels[1:]:
        torch.testing.assert_close(results[k][0], results["loop"][0], msg=k)
        for a, b in zip(results[k][1], results["loop"][1]):  # summation order differs: relative to the scale
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=k)


def test_resolve_expert_kernel():
    """auto picks per device and dtype; an explicit kernel that cannot run here is an error."""
    mkl = blas_batch.available(torch.float32)
    assert resolve_expert_kernel("auto", "cpu", torch.float32, 64, 64 * 64)[0] == (
        "batched" if mkl else "loop"
    )
    assert resolve_expert_kernel("auto", "cpu", torch.float32, 8, 8 * 512)[0] == "loop"
    assert resolve_expert_kernel("auto", "cpu", torch.bfloat16, 64, 64 * 64)[0] == "loop"
    assert resolve_expert_kernel("loop", "cpu", torch.float32, 8, 10) == ("loop", "set in the config")
    assert resolve_expert_kernel("grouped", "cpu", torch.float32, 8, 10)[0] == "grouped"
    with pytest.raises(ValueError, match="'batched' needs the CPU"):
        resolve_expert_kernel("batched", "cpu", torch.bfloat16, 64, 64)
    with pytest.raises(ValueError, match="is not one of"):
        resolve_expert_kernel("fast", "cpu", torch.float32, 8, 10)


def test_resolve_expert_kernel_on_gpus(monkeypatch):
    """The CUDA choice, checked here with the grouped-mm probe answered for a GPU: bf16 takes the
    grouped GEMM; fp32 takes the loop explicitly (_grouped_mm's fp32 path is a per-expert fallback
    that copies the offsets to the host) and says so."""
    import gptoss_titan.model.moe as moe_module

    monkeypatch.setattr(moe_module, "grouped_mm_works", lambda device, dtype: True)
    assert resolve_expert_kernel("auto", "cuda", torch.bfloat16, 32, 4096)[0] == "grouped"
    kernel, why = resolve_expert_kernel("auto", "cuda", torch.float32, 32, 4096)
    assert kernel == "loop" and "float32" in why
    with pytest.raises(ValueError, match="'batched' needs the CPU"):
        resolve_expert_kernel("batched", "cuda", torch.float32, 32, 4096)


def test_combine_is_deterministic_and_exact():
    """Tokens come back from the expert order by a permutation and their K outputs are summed in a
    fixed order: bitwise the same on every call, equal to the per-token definition."""
    args = tiny_args(num_experts=5, top_k=3)
    torch.manual_seed(4)
    moe = MoE(args)
    normal_init(moe, 0.3)
    x = torch.randn(3, 7, args.dim)
    a, _, _ = moe(x)
    b, _, _ = moe(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, naive_moe(moe, x.reshape(-1, args.dim)).reshape_as(a), atol=1e-5, rtol=1e-5)


def test_router_weights_are_fp32_under_bf16_autocast():
    args = tiny_args()
    moe = MoE(args)
    normal_init(moe, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx, logits = moe.router(torch.randn(5, args.dim))
    assert logits.dtype == torch.bfloat16 and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_swiglu_clamps():
    u = torch.tensor([[10.0, 10.0, -10.0, -10.0]])  # (gate, up) pairs
    z = clamped_swiglu(u, 7.0, 1.702)
    assert z[0, 0] == pytest.approx((7 + 1) * 7 * torch.sigmoid(torch.tensor(1.702 * 7)).item())
    assert z[0, 1] == pytest.approx((-7 + 1) * -10 * torch.sigmoid(torch.tensor(-17.02)).item(), rel=1e-4)


def test_swiglu_backward_equals_autograd_and_keeps_only_its_input():
    """The recomputing backward equals autograd through the plain math in fp64, values on the clamp
    bounds included; what it saves for backward is the input alone."""
    from gptoss_titan.model.moe import _swiglu_math

    torch.manual_seed(0)
    u = (torch.randn(64, 32, dtype=torch.float64) * 6).requires_grad_()
    with torch.no_grad():
        u[0, :4] = torch.tensor([7.0, 7.0, -7.0, -7.0], dtype=torch.float64)  # exactly on the bounds
    g = torch.randn(64, 16, dtype=torch.float64)
    ours = torch.autograd.grad(clamped_swiglu(u, 7.0, 1.702), u, g)[0]
    ref = torch.autograd.grad(_swiglu_math(u, 7.0, 1.702), u, g)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        clamped_swiglu(u, 7.0, 1.702)
    assert len(saved) == 1 and saved[0] is u


def test_expert_bias_changes_choice_not_weights():
    args = tiny_args(load_balance_bias=True)
    moe = MoE(args)
    normal_init(moe, 0.02)
    moe.router.expert_bias.zero_()
    x = torch.randn(6, args.dim)
    w0, i0, logits = moe.router(x)
    moe.router.expert_bias[:] = torch.tensor([100.0, 100.0, 0.0, 0.0])
    w1, i1, _ = moe.router(x)
    assert sorted(i1[0].tolist()) == [0, 1]
    torch.testing.assert_close(w1, torch.softmax(logits.gather(-1, i1), -1))
    assert "moe.router.expert_bias" in "".join(build(args).state_dict())


def test_per_layer_aux_loss_sees_layers_collapsed_onto_different_experts():
    """Two layers of 4 experts, top-1, each sending every token to its own expert: the pooled (HF)
    loss sees a balanced model; the per-layer form is the mean of each layer's own loss."""
    n, E = 8, 4
    counts = torch.tensor([[8, 0, 0, 0], [0, 0, 0, 8]])
    probs = torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 8.0]])
    pooled = load_balancing_loss(counts, probs, n)
    per_layer = load_balancing_loss(counts, probs, n, per_layer=True)
    each = [load_balancing_loss(counts[i : i + 1], probs[i : i + 1], n) for i in range(2)]
    assert per_layer.item() == pytest.approx(E * 1.0) and pooled.item() == pytest.approx(E * 0.5)
    assert per_layer.item() == pytest.approx(sum(e.item() for e in each) / 2)
    balanced = torch.full((2, E), n / E)
    assert load_balancing_loss(balanced, balanced, n, per_layer=True).item() == pytest.approx(1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "rows", [4096, 12]
)  # a training micro-batch; a decode step (fewer rows than experts)
def test_grouped_mm_matches_loop_at_20b_expert_shapes_on_cuda(rows):
    """torch._grouped_mm in bf16 at 20b's expert shapes (32 experts, 2880 x 5760), with an empty
    expert, equals one GEMM per expert: forward and every gradient."""
    torch.manual_seed(0)
    dev, E, H, I2 = "cuda", 32, 2880, 5760
    counts = torch.multinomial(torch.ones(E), rows, replacement=True).bincount(minlength=E)
    counts[3] = 0
    counts[0] += rows - int(counts.sum())
    counts = counts.to(dev)
    x = (torch.randn(rows, H, device=dev) * 0.1).bfloat16().requires_grad_()
    w = (torch.randn(E, H, I2, device=dev) * 0.02).bfloat16().requires_grad_()
    b = (torch.randn(E, I2, device=dev) * 0.02).bfloat16().requires_grad_()
    g = torch.randn(rows, I2, device=dev).bfloat16()
    outs = {}
    for name, fn in (
        ("grouped", lambda: _grouped_linear(x, w, b, counts, "grouped")),
        ("loop", lambda: _loop_linear(x, w, b, counts)),
    ):
        out = fn()
        outs[name] = (out, torch.autograd.grad(out, [x, w, b], g))
    (a, ga), (r, gr) = outs["grouped"], outs["loop"]
    torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)
    for p, q in zip(ga, gr):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=5e-2)
    assert ga[1][3].eq(0).all() and ga[2][3].eq(0).all()  # the empty expert's gradients


def test_router_weights_keep_fp64():
    """The top-k softmax runs in at least fp32: an fp64 model keeps fp64 (exact against a direct
    fp64 definition, as OpenAI's reference computes it in fp64), bf16 logits get fp32 weights."""
    from gptoss_titan.model.moe import Router

    r = Router(tiny_args()).double()
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    x = torch.randn(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, idx, logits = r(x)
    assert w.dtype == torch.float64
    assert torch.equal(w, torch.softmax(torch.topk(x @ r.gate.weight.T + r.gate.bias, 2).values, dim=-1))
    assert r.to(torch.bfloat16)(x.to(torch.bfloat16))[0].dtype == torch.float32


def test_grouped_kernel_needs_16_byte_rows(monkeypatch):
    """torch._grouped_mm rejects rows that are not whole 16 bytes at the first step: a GPU run with
    such widths (a custom shape, or I / tp) is refused for 'grouped' with the numbers, and 'auto'
    takes the loop kernel and says why."""
    import gptoss_titan.model.moe as moe_module

    monkeypatch.setattr(moe_module, "grouped_mm_works", lambda device, dtype: True)
    odd = {"dim": 64, "2 x moe_inter_dim / tp": 36, "moe_inter_dim / tp": 18}
    with pytest.raises(ValueError, match="moe_inter_dim / tp = 18"):
        resolve_expert_kernel("grouped", "cuda", torch.bfloat16, 32, 4096, odd)
    kernel, why = resolve_expert_kernel("auto", "cuda", torch.bfloat16, 32, 4096, odd)
    assert kernel == "loop" and "2 x moe_inter_dim / tp = 36" in why
    even = {"dim": 64, "2 x moe_inter_dim / tp": 64, "moe_inter_dim / tp": 32}
    assert resolve_expert_kernel("auto", "cuda", torch.bfloat16, 32, 4096, even)[0] == "grouped"


def test_compiled_decode_gets_an_expert_kernel_without_host_reads(monkeypatch):
    """`sample --compile` (fullgraph) on a GPU in fp32: the "loop" kernel reads per-expert counts on
    the host, a graph break, so the decode step takes _grouped_mm (its fp32 fallback runs inside
    the op); the CPU kernels (custom ops) stay; no _grouped_mm at all is one line."""
    import gptoss_titan.model.moe as moe_module
    from gptoss_titan.model.moe import compile_ready_kernel
    from gptoss_titan.runtime.errors import UserError

    assert compile_ready_kernel("loop", "cpu", torch.float32) == "loop"
    assert compile_ready_kernel("batched", "cpu", torch.float32) == "batched"
    monkeypatch.setattr(moe_module, "grouped_mm_works", lambda device, dtype: True)
    assert compile_ready_kernel("loop", "cuda", torch.float32) == "grouped"
    monkeypatch.setattr(moe_module, "grouped_mm_works", lambda device, dtype: False)
    with pytest.raises(UserError, match="sample without --compile"):
        compile_ready_kernel("loop", "cuda", torch.float32)


def test_expert_bias_updates_sign_and_proportional():
    """The balancing update after a step (counts [L, E] of the global batch): sign moves every bias
    by +-rate; proportional by rate x (mean - load) / mean, so a collapsed expert (E / K x the mean
    with K = 2 of E = 4) moves (E / K - 1) = 1 rate down and idle ones 1 rate up."""
    from gptoss_titan.model.balance import update_expert_bias
    from gptoss_titan.model.moe import Router

    routers = [Router(tiny_args(load_balance_bias=True)) for _ in range(2)]
    counts = torch.tensor([[8, 8, 0, 0], [5, 3, 4, 4]])  # [L, E], mean 4
    update_expert_bias(routers, counts, 0.1, "sign")
    assert routers[0].expert_bias.tolist() == pytest.approx([-0.1, -0.1, 0.1, 0.1])
    assert routers[1].expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    for r in routers:
        r.expert_bias.zero_()
    update_expert_bias(routers, counts, 0.1, "proportional")
    assert routers[0].expert_bias.tolist() == pytest.approx([-0.1, -0.1, 0.1, 0.1])
    assert routers[1].expert_bias.tolist() == pytest.approx([-0.025, 0.025, 0.0, 0.0])

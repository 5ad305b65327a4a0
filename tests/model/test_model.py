import math

import pytest
import torch

from gptoss_titan.model import FLAVORS, Transformer
from gptoss_titan.model.attention import causal_mask, reference_attention, sink_attention
from gptoss_titan.model.loss import IGNORE_INDEX, fused_linear_cross_entropy
from gptoss_titan.model.model import RMSNorm, yarn_inv_freq
from gptoss_titan.model.moe import MoE, clamped_swiglu, grouped_mm_works

from ..conftest import build, tiny_args


def test_init_weights_sets_every_tensor():
    args = tiny_args()
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            t.fill_(float("nan"))
    m.init_weights()
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert torch.isfinite(t).all(), f"{name} left uninitialized"
    ref = build(args)
    torch.testing.assert_close(m.rope_cos, ref.rope_cos)
    m.init_weights(seed=5)
    again = Transformer(args)
    again.init_weights(seed=5)
    for (n, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n  # per-parameter generators: same seed, same values
    assert m.rope_cos.shape == (args.max_seq_len, args.head_dim // 2)


def test_init_distribution():
    m = build(tiny_args(dim=128, vocab_size=4096))
    assert abs(m.tok_embeddings.weight.std().item() - 0.02) < 2e-3
    assert (m.layers[0].attention.wq.bias == 0).all() and (m.norm.weight == 1).all()
    assert m.layers[0].moe.router.gate.bias.std() > 0  # HF: router bias ~ N(0, 0.02)


def test_yarn_gpt_oss_values():
    a = FLAVORS["20b"]
    d, base = a.head_dim, a.rope_theta
    low = d * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(base))
    high = d * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(base))
    assert round(low, 4) == 8.0928 and round(high, 4) == 17.3980
    assert abs(a.yarn_mscale() - 1.3465736) < 1e-7
    inv = yarn_inv_freq(a)
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    i = torch.arange(d // 2, dtype=torch.float32)
    ramp = ((i - low) / (high - low)).clamp(0, 1)
    expected = (1 / (32 * freq)) * ramp + (1 / freq) * (1 - ramp)
    torch.testing.assert_close(inv, expected, rtol=0, atol=0)
    assert inv[0] == 1.0 and inv[8] == 1 / freq[8]  # below low: extrapolated (unchanged)
    torch.testing.assert_close(inv[18:], 1 / (32 * freq[18:]))  # above high: interpolated by 32


def test_yarn_matches_transformers():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from gptoss_titan.model.hf import hf_config

    for name in ("20b", "debug", "bench"):
        a = FLAVORS[name]
        cfg = GptOssConfig(**hf_config(a, "float32"))
        inv, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        torch.testing.assert_close(yarn_inv_freq(a), inv.float(), rtol=0, atol=0)
        assert scale == pytest.approx(a.yarn_mscale())


def test_rmsnorm_dtype_and_value():
    n = RMSNorm(8, 1e-5)
    torch.nn.init.ones_(n.weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = n(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    torch.testing.assert_close(y, (x32 / (x32.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).bfloat16())


def test_window_has_exactly_window_keys():
    m = causal_mask(300, 300, 128, torch.device("cpu"))
    assert m.sum(-1).tolist() == [min(i + 1, 128) for i in range(300)]
    assert m[200, 200] and m[200, 73] and not m[200, 72] and not m[200, 201]
    assert causal_mask(300, 300, None, torch.device("cpu")).sum(-1).tolist() == list(range(1, 301))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_sink_attention_matches_reference(window, G):
    torch.manual_seed(0)
    B, N, T, D = 2, 4, 12, 8
    q = torch.randn(B, N, T, D, requires_grad=True)
    k = torch.randn(B, G, T, D, requires_grad=True)
    v = torch.randn(B, G, T, D, requires_grad=True)
    sinks = torch.randn(N, requires_grad=True)
    out = sink_attention(q, k, v, sinks, window)
    ref = reference_attention(q, k, v, sinks, window)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, sinks], g)
    rgrads = torch.autograd.grad(ref, [q, k, v, sinks], g)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sink_takes_its_share():
    # one key, score s, sink S: kept weight = e^s / (e^s + e^S) = sigmoid(s - S)
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 1, 4)
    v = torch.ones(1, 1, 1, 4)
    sinks = torch.tensor([math.log(3.0)])  # p_sink = 3 / 4
    out = sink_attention(q, k, v, sinks, None)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_sliding_layer_ignores_tokens_outside_window():
    args = tiny_args(n_layers=1, sliding_window=8)
    m = build(args)
    attn = m.layers[0].attention
    assert attn.window == 8
    x = torch.randn(1, 20, args.dim)
    cos, sin = m.rope_cos[:20], m.rope_sin[:20]
    base = attn(x, cos, sin)
    x2 = x.clone()
    x2[0, 11] += 1.0  # position 19 sees 12..19 only
    out = attn(x2, cos, sin)
    torch.testing.assert_close(out[0, 19], base[0, 19])
    assert not torch.allclose(out[0, 18], base[0, 18])  # 18 sees 11..18
    x3 = x.clone()
    x3[0, 12] += 1.0
    assert not torch.allclose(attn(x3, cos, sin)[0, 19], base[0, 19])


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


@pytest.mark.parametrize("batched", [False, True], ids=["gemm_loop", "blas_batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_kernels_agree(dtype, batched, monkeypatch):
    """The CPU op (its loop of GEMMs and its one batched BLAS call), the grouped matmul and the loop
    equal a per-row reference, forward and backward (x, w and bias), with an expert that gets no
    rows (its weight and bias gradients are zero)."""
    from gptoss_titan.model import blas_batch

    if batched and not blas_batch.available(dtype):
        pytest.skip("no batched BLAS in this PyTorch build (MKL on x86-64 Linux has it)")
    monkeypatch.setattr(blas_batch, "worth_batching", lambda n_experts, n_rows: batched)
    with torch.no_grad():  # the probe must not depend on the caller's grad mode
        assert grouped_mm_works("cpu", torch.float32), "torch._grouped_mm should work on CPU in torch >= 2.9"
    from gptoss_titan.model.moe import _grouped_linear

    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])  # includes an empty expert
    x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([x[r] @ w[expert[r]] + b[expert[r]] for r in range(10)])
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, w, b], g)
    kernels = ["expert_linear", "loop"] + (["grouped_mm"] if dtype == torch.float32 else [])
    for kernel in kernels:
        out = _grouped_linear(x, w, b, counts, kernel)
        torch.testing.assert_close(out, ref, msg=kernel)
        got = torch.autograd.grad(out, [x, w, b], g)
        for name, p, q in zip("xwb", got, want):
            torch.testing.assert_close(p, q, msg=f"{kernel} d{name}")
    assert got[1][1].eq(0).all() and got[2][1].eq(0).all()


@pytest.mark.parametrize("batched", [False, True], ids=["gemm_loop", "blas_batch"])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_linear_custom_op_registration(bias, batched, monkeypatch):
    """Fake kernels, autograd registration and schema agree with the real ops (torch.compile needs them)."""
    from gptoss_titan.model import blas_batch
    from gptoss_titan.model.expert_mm import expert_linear, expert_linear_wgrad

    monkeypatch.setattr(blas_batch, "worth_batching", lambda n_experts, n_rows: batched)

    torch.manual_seed(0)
    counts = torch.tensor([4, 0, 7, 5])
    x, g = torch.randn(16, 12, requires_grad=True), torch.randn(16, 6)
    w = torch.randn(4, 12, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True) if bias else None
    torch.library.opcheck(expert_linear, (x, w, b, counts))
    torch.library.opcheck(expert_linear_wgrad, (x.detach(), g, counts))
    with torch.inference_mode():  # generation runs the op in inference mode
        y = expert_linear(x, w, b, counts)
    torch.testing.assert_close(y, expert_linear(x, w, b, counts).detach())


def test_swiglu_clamps():
    u = torch.tensor([[10.0, 10.0, -10.0, -10.0]])  # (gate, up) pairs
    z = clamped_swiglu(u, 7.0, 1.702)
    assert z[0, 0] == pytest.approx((7 + 1) * 7 * torch.sigmoid(torch.tensor(1.702 * 7)).item())
    assert z[0, 1] == pytest.approx((-7 + 1) * -10 * torch.sigmoid(torch.tensor(-17.02)).item(), rel=1e-4)


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


def test_forward_with_targets_equals_logits_path():
    m = build(tiny_args())
    tok = torch.randint(0, 256, (2, 20))
    logits = m(tok)
    ce, probs, counts = m(tok[:, :-1], tok[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), tok[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(ce, ref)
    assert probs is None and counts.shape == (2, 4) and counts.sum() == 2 * 2 * 19 * 2


def test_too_long_sequence_is_rejected():
    m = build(tiny_args(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds"):
        m(torch.zeros(1, 17, dtype=torch.long))


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

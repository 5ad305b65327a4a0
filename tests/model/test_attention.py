"""The fused attention paths equal the reference math (forward and backward, every input's gradient)."""

import math

import pytest
import torch

from gptoss_titan.model.attention import (
    _window_block_mask,
    causal_mask,
    flash_sink_attention,
    flex_sink_attention,
    position_mask,
    reference_attention,
    sink_attention,
)

SHAPES = [  # B, N, G, T, D, window
    (2, 8, 2, 100, 32, None),  # GQA, full causal
    (2, 8, 2, 100, 32, 16),  # sliding, T not a multiple of the window
    (1, 4, 4, 37, 16, 8),  # MHA
    (2, 4, 1, 64, 16, 128),  # MQA, window longer than T (plain causal)
    (1, 4, 2, 129, 16, 64),  # one key past two blocks
    (1, 2, 1, 256, 8, 32),  # exactly 8 blocks
]


def inputs(B, N, G, T, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=g, dtype=dtype) for n in (N, G, G))
    sinks = torch.randn(N, generator=g, dtype=dtype) * 2
    return [t.requires_grad_() for t in (q, k, v, sinks)]


@pytest.mark.parametrize("shape", SHAPES)
def test_flash_sink_attention_forward_and_backward(shape):
    B, N, G, T, D, W = shape
    x = inputs(B, N, G, T, D)
    out, ref = flash_sink_attention(*x, W), reference_attention(*x, W)
    # fp64 end to end (the kernels' lse, the gate and d sink too): ~1e-14 here; an fp32 step
    # anywhere shows up as ~1e-6 (it did: the gate was computed in fp32 and failed on another CPU).
    assert (out - ref).abs().max() < 1e-10
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, x, grad)
    theirs = torch.autograd.grad(ref, x, grad)
    for name, a, b in zip(("q", "k", "v", "sinks"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float64
        assert (a - b).abs().max() < 1e-10, name


def test_flash_sink_attention_fp32_and_bf16():
    x = inputs(2, 8, 2, 200, 32, dtype=torch.float32)
    for W in (None, 64):
        ref = reference_attention(*x, W)
        assert (flash_sink_attention(*x, W) - ref).abs().max() < 2e-6
        xb = [t.detach().bfloat16() for t in x]
        assert (flash_sink_attention(*xb, W).float() - ref).abs().max() < 3e-2


def test_window_block_mask_is_exactly_the_window():
    W, nb = 4, 3
    m = _window_block_mask(W, nb, torch.float32, torch.device("cpu")) == 0  # [nb, 1, W, 2W] visible
    assert m.shape == (nb, 1, W, 2 * W)
    assert m[1:].sum(-1).eq(W).all()  # every query sees exactly W keys once a full block precedes it
    assert m[0, 0].sum(-1).tolist() == [1, 2, 3, 4]  # block 0: only keys 0..i of its own block


def test_window_cost_is_linear_in_length():
    """A sliding layer never builds a T x T score or mask: the saved mask is [T / W, 1, W, 2W]."""
    B, N, G, T, D, W = 1, 2, 1, 1024, 8, 32
    x = inputs(B, N, G, T, D, dtype=torch.float32)
    out = flash_sink_attention(*x, W)
    sizes, fn = [], out.grad_fn
    while fn is not None and not sizes:  # walk back to the flash node and look at what it kept
        if "flash_sink" in type(fn).__name__.lower() or "BackwardCFunction" in type(fn).__name__:
            sizes = [t.numel() for t in fn.saved_tensors if t is not None]
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert sizes and max(sizes) <= 4 * T * N * D, sizes  # nothing of size T x T


def test_flex_path_matches_reference_forward():
    """The CUDA path (flex_attention + log-sum-exp rescale) computes the same values; its forward
    runs here on CPU, its backward needs a GPU (flex has no CPU backward)."""
    for B, N, G, T, D, W in SHAPES[:3]:
        x = [t.detach().float() for t in inputs(B, N, G, T, D)]
        with torch.no_grad():
            assert (flex_sink_attention(*x, W) - reference_attention(*x, W)).abs().max() < 2e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward runs on CUDA only")
def test_flex_path_backward_on_cuda():
    x = [t.detach().float().cuda().requires_grad_() for t in inputs(2, 8, 2, 256, 64)]
    for W in (None, 64):
        out, ref = flex_sink_attention(*x, W), reference_attention(*x, W)
        grad = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, x, grad), torch.autograd.grad(ref, x, grad)):
            assert (a - b).abs().max() < 1e-4


def test_masked_sdpa_path_still_exact():
    x = inputs(2, 8, 2, 100, 32)
    assert (sink_attention(*x, 16) - reference_attention(*x, 16)).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_custom_op_registration(causal, dtype):
    """Fake (meta) kernels, autograd registration and schema agree with the real op (torch.compile needs them)."""
    from gptoss_titan.model.attention import flash_sink_op

    q, k, v, sinks = (t.detach().to(dtype).requires_grad_() for t in inputs(2, 4, 2, 24, 16))
    mask = None if causal else torch.zeros(1, 1, 24, 24, dtype=dtype)
    torch.library.opcheck(flash_sink_op, (q, k, v, sinks, causal, mask, 0.25))


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


def test_position_mask_hides_empty_slots_and_old_keys():
    """KV-cache masks come from stored positions: -1 (an empty slot) is never visible, and on a
    sliding layer only the last `window` positions are."""
    k_pos = torch.tensor([8, 9, -1, 6, 7])  # a ring of 5 slots, one still empty
    q_pos = torch.tensor([9])
    assert position_mask(q_pos, k_pos, None).tolist() == [[True, True, False, True, True]]
    assert position_mask(q_pos, k_pos, 3).tolist() == [[True, True, False, False, True]]
    assert position_mask(torch.tensor([0]), torch.tensor([-1, 0]), 128).tolist() == [[False, True]]


def test_flex_path_under_compile_takes_its_mask_from_outside():
    """The CUDA attention under torch.compile(fullgraph=True) (eager backend here: flex's CPU forward)
    equals the reference with the block mask passed in, which is built once per shape outside the
    compiled region (the model's forward builds it; lru_cache does not work inside a graph)."""
    from gptoss_titan.model import attention

    attention.flex_block_mask.cache_clear()
    fn = torch.compile(flex_sink_attention, fullgraph=True, backend="eager")
    x = [t.detach().float() for t in inputs(2, 4, 2, 64, 16)]
    with torch.no_grad():
        for _ in range(2):
            for W in (None, 16):
                mask = attention.flex_block_mask(64, W, "cpu")
                assert (fn(*x, W, mask) - reference_attention(*x, W)).abs().max() < 2e-6
    info = attention.flex_block_mask.cache_info()
    assert (info.misses, info.hits) == (2, 2)  # built once per (shape, window), reused after

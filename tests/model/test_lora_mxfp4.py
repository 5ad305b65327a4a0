"""A LoRA run's MXFP4-resident base (lora.base_format = "mxfp4"): experts held as the released
uint8 blocks and scales, dequantized per layer in the forward and in backward. Forward and
backward equal the same adapters on the dequantized base; no full-precision copy of the experts
is a parameter or is saved for backward (a saved-tensor audit)."""

import pytest
import torch

from gptoss_titan.model import Transformer
from gptoss_titan.model.lora import LoRASpec, add_lora, is_adapter, store_base
from gptoss_titan.model.mxfp4 import (
    CHUNK_ELEMS,
    dequantize_experts,
    dequantize_mxfp4,
    quantize_dequantize,
    quantize_mxfp4,
)

from ..conftest import build, tiny_args

SPEC = LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("attention", "experts", "router"))
ARGS = dict(dim=64, moe_inter_dim=32)  # input widths: whole 32-value blocks


def pair(kernel: str = "loop", dtype=torch.float64) -> tuple[Transformer, Transformer]:
    """(adapters on the base with its experts rounded to MXFP4 values, the same adapters on the
    MXFP4-resident base holding those experts' blocks and scales); every B nonzero."""
    args = tiny_args(**ARGS)
    base = build(args, 0)
    models = []
    for mxfp4 in (False, True):
        with torch.device("meta"):
            m = Transformer(args)
        add_lora(m, SPEC)
        store_base(m, dtype, mxfp4_experts=mxfp4)
        m.to_empty(device="cpu")
        m.init_buffers()
        models.append(m.to(dtype))  # (the adapters too; uint8 stays uint8)
    ref, res = models
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if is_adapter(n):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
        for n, v in base.state_dict().items():
            if ".experts.w_" in n:
                v = quantize_dequantize(v)  # the values an MXFP4 base holds
            ref.state_dict()[n].copy_(v)
        for n, v in ref.state_dict().items():
            prefix, _, matrix = n.rpartition(".w_")
            if ".experts.w_" in n:
                blocks, scales = quantize_mxfp4(v)
                res.state_dict()[f"{prefix}.w_{matrix}_blocks"].copy_(blocks)
                res.state_dict()[f"{prefix}.w_{matrix}_scales"].copy_(scales)
            else:
                res.state_dict()[n].copy_(v)
    for m in models:
        m.set_expert_kernel(kernel)
    return ref, res


def test_the_resident_base_holds_uint8_experts_and_no_full_precision_copy():
    _, res = pair()
    experts = res.layers[0].moe.experts
    E, H, I = 4, 64, 32
    assert experts.w_gate_up_blocks.shape == (E, 2 * I, H // 32, 16)  # the released layout
    assert experts.w_down_scales.shape == (E, H, I // 32)
    assert not hasattr(experts, "w_gate_up") and not hasattr(experts, "w_down")
    floats = {n for n, p in res.named_parameters() if ".experts.w_" in n and p.is_floating_point()}
    assert not floats
    frozen = {n for n, p in res.named_parameters() if not p.requires_grad}
    assert {n for n, p in res.named_parameters() if p.requires_grad} == {
        n for n, _ in res.named_parameters() if is_adapter(n)
    } and frozen


@pytest.mark.parametrize("kernel", ["loop", "batched"])
def test_forward_and_backward_equal_the_dequantized_base(kernel):
    """fp64: the same logits (bitwise: the same weights in the same GEMMs) and the same adapter
    gradients (the input gradient through the frozen experts is computed from a fresh dequantize
    in backward instead of autograd's saved weight: equal up to fp64 rounding)."""
    ref, res = pair(kernel)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = ref(tokens), res(tokens)
    assert torch.equal(a, b)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=a.dtype)
    (a * w).sum().backward()
    (b * w).sum().backward()
    grads = {n: p.grad for n, p in res.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-14, msg=n)
        else:
            assert p.grad is None


def test_saved_tensor_audit_finds_no_full_precision_experts():
    """Every tensor autograd keeps for backward in a training forward: the resident base keeps the
    uint8 blocks and scales (the parameters themselves) and no float tensor of an expert weight's
    size; the dequantized base keeps its float expert weights (what the audit would catch)."""
    ref, res = pair()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    E, H, I = 4, 64, 32
    expert_shapes = {(E, H, 2 * I), (E, 2 * I, H), (E, I, H), (E, H, I)}  # either layout

    def audit(model):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens).sum()
        loss.backward()
        return saved

    kept = audit(res)
    big_floats = [t for t in kept if t.is_floating_point() and tuple(t.shape) in expert_shapes]
    assert not big_floats, [tuple(t.shape) for t in big_floats]
    assert sum(t.dtype == torch.uint8 for t in kept) == 2 * 2 * 2  # 2 layers x 2 matrices x (blocks, scales)
    kept_ref = audit(ref)
    assert any(t.is_floating_point() and tuple(t.shape) in expert_shapes for t in kept_ref)


@pytest.mark.parametrize("transposed", [False, True])
def test_chunked_dequantize_equals_the_whole(monkeypatch, transposed):
    """dequantize_experts bounds its temporaries by dequantizing a few experts at a time: the
    same values as dequantize_mxfp4 at once, in either layout."""
    w = torch.randn(5, 64, 48, generator=torch.Generator().manual_seed(0))
    blocks, scales = quantize_mxfp4(w)
    whole = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    monkeypatch.setattr("gptoss_titan.model.mxfp4.CHUNK_ELEMS", 2 * 64 * 48)  # 2 experts per chunk
    got = dequantize_experts(blocks, scales, torch.bfloat16, transposed)
    assert torch.equal(got, whole.transpose(1, 2) if transposed else whole)
    assert CHUNK_ELEMS >= 1 << 20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resident_base_on_cuda_grouped_kernel():
    """bf16 on CUDA with torch._grouped_mm: the resident base's logits equal the dequantized base's
    bitwise (the same bf16 weights in the same GEMMs), the adapter gradients to bf16 precision;
    (the CPU audit above checks what is kept for backward)."""
    ref, res = pair("grouped", torch.bfloat16)
    ref, res = ref.cuda(), res.cuda()
    tokens = torch.randint(0, 256, (2, 64), device="cuda")
    a = ref(tokens)
    a.float().sum().backward()
    b = res(tokens)
    b.float().sum().backward()
    assert torch.equal(a, b)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            g = dict(res.named_parameters())[n].grad
            torch.testing.assert_close(g.float(), p.grad.float(), rtol=2e-2, atol=2e-3, msg=n)

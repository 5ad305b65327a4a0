"""LoRA adapters (model/lora.py): exact base logits at start, gradients for the adapters only, the
expert adapters equal to merged weights, and the [lora] config's one-line errors."""

import pytest
import torch

from gptoss_titan.model import Transformer
from gptoss_titan.model.lora import LoRASpec, add_lora, is_adapter, merged_state_dict

from ..conftest import build, tiny_args

ALL = LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("attention", "experts", "router"))


def adapter_model(spec: LoRASpec, seed: int = 0, **kw) -> tuple[Transformer, Transformer]:
    """(base, the same base with adapters) in fp64, adapters drawn by init_weights."""
    args = tiny_args(**kw)
    base = build(args, seed).double()
    with torch.device("meta"):
        m = Transformer(args)
    add_lora(m, spec)
    m.to_empty(device="cpu")
    m.init_weights(seed=1)
    m = m.double()
    missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(is_adapter(k) for k in missing)
    return base, m


def test_adapters_start_at_the_base_exactly_and_only_they_get_gradients():
    base, m = adapter_model(ALL)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m(tokens), base(tokens))  # B = 0: bitwise the base
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    # 2 layers x (4 attention + router) x (A, B) + 2 layers x 2 expert matrices x (A, B)
    assert len(names) == 2 * 5 * 2 + 2 * 2 * 2 and all(is_adapter(n) for n in names)
    m(tokens).sum().backward()
    for n, p in m.named_parameters():
        if is_adapter(n):
            assert p.grad is not None, n
            if n.endswith("_B") or n.endswith("lora_B"):  # dL/dA = 0 while B = 0
                assert p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("kernel", ["loop", "batched"])
def test_trained_adapters_equal_their_merged_weights(kernel):
    """With every B nonzero, the adapter model's logits equal the base with s B A (linear) and
    s A_e B_e (each expert) added to its weights (fp64)."""
    _, m = adapter_model(ALL)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if is_adapter(n):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    m.set_expert_kernel(kernel)
    merged = build(tiny_args(), 0).double()
    merged.load_state_dict(merged_state_dict(m.state_dict(), ALL.scale))
    merged.set_expert_kernel(kernel)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(tokens), merged(tokens), rtol=1e-10, atol=1e-10)
    assert not torch.equal(m(tokens), build(tiny_args(), 0).double()(tokens))


def test_targets_and_layers_choose_what_gets_adapters():
    _, m = adapter_model(LoRASpec(4, 8.0, 0.0, ("experts",), layers=(1,)))
    names = sorted(n for n, _ in m.named_parameters() if is_adapter(n))
    assert names == [f"layers.1.moe.experts.lora_{w}_{ab}" for w in ("down", "gate_up") for ab in "AB"]
    assert m.layers[1].moe.experts.lora_gate_up_A.shape == (4, 64, 4)  # [E, H, r]
    assert m.layers[1].moe.experts.lora_down_B.shape == (4, 4, 64)  # [E, r, H]


def bf16_expert_adapters(rank: int, device: str) -> Transformer:
    """The tiny model with rank-r adapters on every expert, all of them nonzero, in bf16 on device."""
    with torch.device("meta"):
        m = Transformer(tiny_args())
    add_lora(m, LoRASpec(rank, 2.0 * rank, 0.0, ("experts",)))
    m.to_empty(device=device)
    m.init_weights(seed=0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if is_adapter(n):
                p.normal_(0, 0.1, generator=torch.Generator(device).manual_seed(1))
    return m.to(torch.bfloat16)


@pytest.mark.parametrize("rank", [4, 8])
def test_expert_adapters_on_the_grouped_kernel_at_any_rank(rank):
    """torch._grouped_mm needs 16-byte row strides: a bf16 rank-4 adapter (8 bytes) is padded with
    zero columns (no fallback to the loop kernel, which syncs with the host on CUDA); either way the
    result is the loop kernel's."""
    from gptoss_titan.model.moe import grouped_mm_works

    if not grouped_mm_works("cpu", torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run in bf16 on this CPU build")
    m = bf16_expert_adapters(rank, "cpu")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for kernel in ("loop", "grouped"):
        m.set_expert_kernel(kernel)
        out[kernel] = m(tokens)
        out[kernel].float().sum().backward()
    assert torch.equal(out["loop"], out["grouped"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rank", [4, 16])
def test_expert_adapters_on_cuda_grouped_kernel(rank):
    """bf16 on CUDA ("auto" picks grouped_mm): forward and backward run at a rank whose rows are
    not 16 bytes, and equal the loop kernel to bf16 precision."""
    m = bf16_expert_adapters(rank, "cuda")
    tokens = torch.randint(0, 256, (2, 64), device="cuda")
    out = {}
    for kernel in ("loop", "grouped"):
        m.set_expert_kernel(kernel)
        out[kernel] = m(tokens).float()
        out[kernel].sum().backward()
    torch.testing.assert_close(out["grouped"], out["loop"], rtol=2e-2, atol=2e-2)

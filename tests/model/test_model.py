"""The transformer (model.py): initialization, RoPE, RMSNorm, the layer structure, the one forward."""

import math

import pytest
import torch

from gptoss_titan.model import FLAVORS, Transformer
from gptoss_titan.model.model import RMSNorm, yarn_inv_freq

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


def test_forward_with_targets_equals_logits_path():
    m = build(tiny_args())
    tok = torch.randint(0, 256, (2, 20))
    logits = m(tok)
    ce, probs, counts = m(tok[:, :-1], tok[:, 1:])
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 256), tok[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(ce, ref)
    assert probs is None and counts.shape == (2, 4) and counts.sum() == 2 * 2 * 19 * 2


def test_too_long_sequence_is_rejected():
    m = build(tiny_args(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_attention_masks_built_once_per_forward_outside_compiled_regions(monkeypatch):
    """The forward builds one mask per window type (not one per layer) and passes it in; the
    masks are cached per shape, so a second forward of the same shape builds nothing."""
    import gptoss_titan.model.model as model_module
    from gptoss_titan.model import attention

    args = tiny_args(n_layers=4, sliding_window=8)
    m = build(args)
    calls = []
    real = attention.attention_mask
    monkeypatch.setattr(model_module, "attention_mask", lambda *a: calls.append(a) or real(*a))
    attention._cpu_window_mask.cache_clear()
    tok = torch.randint(0, 256, (2, 40))
    m(tok)
    assert sorted(str(c[2]) for c in calls) == ["8", "None"]  # 4 layers, 2 window types
    hits = attention._cpu_window_mask.cache_info().hits
    m(tok)
    assert attention._cpu_window_mask.cache_info().hits == hits + 1  # the sliding mask came from the cache

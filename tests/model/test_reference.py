"""Our Transformer against OpenAI's reference implementation, bitwise in fp64.

The reference is `gpt_oss/torch/model.py` of the `gpt-oss` wheel (pure torch; the wheel is tagged
for Python 3.12, so it is read from the file, not installed). The README's test command fetches it
from the package index before the tests run (nothing downloads here):

  pip download --no-deps --only-binary=:all: --python-version 3.12 -d .reference gpt-oss==0.0.9

Every weight random (biases, sinks and norm scales included), a tiny shape of our own (4 layers:
two sliding-window, two full; 8 experts, top 4; 24 tokens, past the window of 8), the real RoPE /
YaRN settings. The weights go reference -> Hugging Face names -> `from_hf`, so the converter's
mapping (fused qkv split, expert matrices transposed, gate/up interleaved) is checked too.
"""

import hashlib
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from gptoss_titan.model import ModelArgs, Transformer
from gptoss_titan.model.hf import from_hf

WHEEL = Path(__file__).resolve().parents[2] / ".reference" / "gpt_oss-0.0.9-py3-none-any.whl"
SOURCE_SHA256 = "319ba3c6e4d827eb3115fe4838942af448376b513c02cea4b6b471bf6c21a346"  # its torch/model.py
FETCH = "pip download --no-deps --only-binary=:all: --python-version 3.12 -d .reference gpt-oss==0.0.9"
L, H, N, G, D, E, K, INTER, V, W = 4, 64, 4, 2, 64, 8, 4, 32, 256, 8


def reference_module(monkeypatch) -> types.ModuleType:
    if not WHEEL.is_file():
        pytest.fail(
            f"OpenAI's reference is missing: run `{FETCH}` in the repository (the README's test command does)"
        )
    src = zipfile.ZipFile(WHEEL).read("gpt_oss/torch/model.py")
    assert hashlib.sha256(src).hexdigest() == SOURCE_SHA256, "another version of the reference"
    # it imports its checkpoint reader (safetensors, MXFP4 decoding), which this test does not use
    for name in ("gpt_oss", "gpt_oss.torch", "gpt_oss.torch.weights"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["gpt_oss.torch.weights"].Checkpoint = object
    mod = types.ModuleType("gpt_oss.torch.model")
    exec(compile(src, "gpt_oss/torch/model.py", "exec"), mod.__dict__)
    return mod


def to_hf(sd: dict) -> dict:
    """The reference's parameter names -> Hugging Face gpt-oss names (SPEC.md)."""
    hf = {
        "model.embed_tokens.weight": sd["embedding.weight"],
        "model.norm.weight": sd["norm.scale"],
        "lm_head.weight": sd["unembedding.weight"],
    }
    q, kv = N * D, G * D
    parts = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    for i in range(L):
        b, o = f"block.{i}.", f"model.layers.{i}."
        for name, rows in parts.items():
            hf[o + f"self_attn.{name}_proj.weight"] = sd[b + "attn.qkv.weight"][rows]
            hf[o + f"self_attn.{name}_proj.bias"] = sd[b + "attn.qkv.bias"][rows]
        hf |= {
            o + "self_attn.o_proj.weight": sd[b + "attn.out.weight"],
            o + "self_attn.o_proj.bias": sd[b + "attn.out.bias"],
            o + "self_attn.sinks": sd[b + "attn.sinks"],
            o + "input_layernorm.weight": sd[b + "attn.norm.scale"],
            o + "post_attention_layernorm.weight": sd[b + "mlp.norm.scale"],
            o + "mlp.router.weight": sd[b + "mlp.gate.weight"],
            o + "mlp.router.bias": sd[b + "mlp.gate.bias"],
            o + "mlp.experts.gate_up_proj": sd[b + "mlp.mlp1_weight"].transpose(1, 2),  # [E, H, 2I]
            o + "mlp.experts.gate_up_proj_bias": sd[b + "mlp.mlp1_bias"],
            o + "mlp.experts.down_proj": sd[b + "mlp.mlp2_weight"].transpose(1, 2),  # [E, I, H]
            o + "mlp.experts.down_proj_bias": sd[b + "mlp.mlp2_bias"],
        }
    return hf


def test_fp64_logits_equal_openai_reference_bitwise(monkeypatch):
    ref = reference_module(monkeypatch)
    cfg = ref.ModelConfig(num_hidden_layers=L, num_experts=E, experts_per_token=K, vocab_size=V, hidden_size=H,
                          intermediate_size=INTER, head_dim=D, num_attention_heads=N, num_key_value_heads=G,
                          sliding_window=W)  # fmt: skip
    theirs = ref.Transformer(cfg, device="cpu").double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():  # norm scales around 1, everything else around 0
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if n.endswith("scale") else 0.0)
            )
    args = ModelArgs(dim=H, n_layers=L, n_heads=N, n_kv_heads=G, head_dim=D, vocab_size=V, num_experts=E, top_k=K,
                     moe_inter_dim=INTER, sliding_window=W, max_seq_len=64)  # fmt: skip
    with torch.device("meta"):
        ours = Transformer(args)
    ours.to_empty(device="cpu")
    ours.init_weights()
    ours.double()
    state = from_hf(to_hf({n: p.detach() for n, p in theirs.named_parameters()}), args)
    ours.load_state_dict({k: v.clone() for k, v in state.items()})
    tokens = torch.randint(0, V, (24,), generator=g)
    with torch.no_grad():
        want = theirs(tokens)  # [T, V]
        got = ours(tokens.unsqueeze(0))[0]
    assert got.dtype == want.dtype == torch.float64 and want.abs().max() > 1
    assert torch.equal(got, want), f"max |difference| {(got - want).abs().max().item():.3e}"

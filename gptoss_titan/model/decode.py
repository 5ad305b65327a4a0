"""A one-token decode step with static shapes, so `torch.compile` can fuse the whole step.

Shape legend: B batch, H hidden, N query heads, G kv heads, D head dim, C cache slots, K experts
per token, I expert intermediate size, V vocab.

The eager path (`Transformer.forward(..., cache=...)`) attends to views of the cache that grow
with the length and sorts routed rows by expert; both have data-dependent shapes. This step uses
the same `KVCache` (filled by the prompt's prefill) but always attends to all C slots of each
layer (the whole context for full layers, the window for sliding ones), masked by the absolute
position stored per slot (-1 = empty); the position is a tensor, and the MoE gathers the K chosen
experts' weights per row, so one compiled graph serves every step. Same math as the model (tests
compare the logits at every step).
"""

from __future__ import annotations

import torch

from .attention import decode_attention
from .kv_cache import KVCache
from .model import Transformer, apply_rope
from .moe import clamped_swiglu


def _moe_rows(moe, x: torch.Tensor) -> torch.Tensor:
    """x [B, H] -> [B, H]: each row through its K experts, the experts' weights gathered per row."""
    weights, idx, _ = moe.router(x)  # [B, K], [B, K]
    ex = moe.experts
    u = torch.einsum("bh,bkhj->bkj", x, ex.w_gate_up[idx]) + ex.b_gate_up[idx]  # [B, K, 2I]
    z = clamped_swiglu(u, ex.limit, ex.alpha)  # [B, K, I]
    y = torch.einsum("bki,bkih->bkh", z, ex.w_down[idx]) + ex.b_down[idx]  # [B, K, H]
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens [B, 1] at absolute position pos (0-d long tensor) -> logits [B, V]; updates the cache."""
    a = model.args
    B = tokens.shape[0]
    p = pos.view(1)
    cos, sin = model.rope_cos.index_select(0, p), model.rope_sin.index_select(0, p)  # [1, D/2]
    h = model.tok_embeddings(tokens)  # [B, 1, H]
    for i, layer in enumerate(model.layers):
        att = layer.attention
        x = layer.attention_norm(h)
        q = att.wq(x).view(B, 1, a.n_heads, a.head_dim).transpose(1, 2)  # [B, N, 1, D]
        k = att.wk(x).view(B, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)  # [B, G, 1, D]
        v = att.wv(x).view(B, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        lc = cache.layers[i]
        slot = p % lc.capacity if lc.ring else p
        lc.k.index_copy_(2, slot, k.to(lc.k.dtype))
        lc.v.index_copy_(2, slot, v.to(lc.v.dtype))
        lc.pos.index_copy_(0, slot, p)
        allowed = (lc.pos >= 0) & (lc.pos <= pos)
        if att.window is not None:
            allowed = allowed & (lc.pos > pos - att.window)
        out = decode_attention(q, lc.k.to(q.dtype), lc.v.to(q.dtype), att.sinks, allowed.view(1, -1))
        h = h + att.wo(out.transpose(1, 2).reshape(B, 1, -1))
        h = h + _moe_rows(layer.moe, layer.ffn_norm(h).view(B, -1)).view(B, 1, -1).to(h.dtype)
    return model.output(model.norm(h))[:, -1]  # [B, V]

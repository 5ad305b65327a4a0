"""A one-token decode step with static shapes, so `torch.compile` can fuse the whole step.

Shape legend: B batch, H hidden, N query heads, G kv heads, D head dim, C cache slots, K experts
per token, I expert intermediate size, V vocab.

The eager path (`Transformer.forward(..., cache=...)`) grows its cache views with the length and
sorts routed rows by expert; both have data-dependent shapes. Here every layer keeps a fixed
buffer of C slots (the whole context for full layers, the window for sliding ones) with the
absolute position of each slot (-1 = empty), the position is a tensor, masks are built from
positions, and the MoE gathers the K chosen experts' weights per row, so one compiled graph
serves every step. Same math as the model (tests compare the logits at every step).
"""

from __future__ import annotations

import torch

from .attention import decode_attention
from .model import Transformer, apply_rope
from .moe import clamped_swiglu


class StaticCache:
    """Per layer: k, v [B, G, C, D] and pos [C] (absolute position of each slot, -1 = empty)."""

    def __init__(self, model: Transformer, batch: int, max_len: int, dtype: torch.dtype | None = None):
        a = model.args
        dtype = dtype or model.tok_embeddings.weight.dtype
        dev = model.rope_cos.device
        self.slots = [min(a.sliding_window, max_len) if a.is_sliding(i) else max_len for i in range(a.n_layers)]
        self.k = [torch.zeros(batch, a.n_kv_heads, c, a.head_dim, dtype=dtype, device=dev) for c in self.slots]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pos = [torch.full((c,), -1, dtype=torch.long, device=dev) for c in self.slots]

    def fill_from(self, model: Transformer, cache) -> None:
        """Copy a prefilled eager KVCache (same slot layout: position p in slot p, or p mod W)."""
        for i, lc in enumerate(cache.layers):
            n = min(lc.k.shape[2], self.slots[i])
            self.k[i][:, :, :n] = lc.k[:, :, :n]
            self.v[i][:, :, :n] = lc.v[:, :, :n]
            self.pos[i][:n] = lc.pos[:n]


def _moe_rows(moe, x: torch.Tensor) -> torch.Tensor:
    """x [B, H] -> [B, H]: each row through its K experts, the experts' weights gathered per row."""
    weights, idx, _ = moe.router(x)  # [B, K], [B, K]
    ex = moe.experts
    u = torch.einsum("bh,bkhj->bkj", x, ex.w_gate_up[idx]) + ex.b_gate_up[idx]  # [B, K, 2I]
    z = clamped_swiglu(u, ex.limit, ex.alpha)  # [B, K, I]
    y = torch.einsum("bki,bkih->bkh", z, ex.w_down[idx]) + ex.b_down[idx]  # [B, K, H]
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: StaticCache) -> torch.Tensor:
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
        slot = p % cache.slots[i] if att.window is not None else p
        cache.k[i].index_copy_(2, slot, k.to(cache.k[i].dtype))
        cache.v[i].index_copy_(2, slot, v.to(cache.v[i].dtype))
        cache.pos[i].index_copy_(0, slot, p)
        kp = cache.pos[i]
        allowed = (kp >= 0) & (kp <= pos)
        if att.window is not None:
            allowed = allowed & (kp > pos - att.window)
        out = decode_attention(q, cache.k[i].to(q.dtype), cache.v[i].to(q.dtype), att.sinks, allowed.view(1, -1))
        h = h + att.wo(out.transpose(1, 2).reshape(B, 1, -1))
        h = h + _moe_rows(layer.moe, layer.ffn_norm(h).view(B, -1)).view(B, 1, -1).to(h.dtype)
    return model.output(model.norm(h))[:, -1]  # [B, V]

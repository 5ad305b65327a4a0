"""Attention math for gpt-oss: causal (optionally sliding-window) GQA with per-head sinks.

Shape legend: B batch, N query heads, G kv heads, T queries, S keys, D head dim.

A sink is one learned logit per query head, S_h, appended to every score row as an extra column
(not scaled, not rotated, position-free). Softmax runs over the row plus that column and the sink
column is dropped, so the kept weights sum to 1 - p_sink.

The sink as a rescale: with O and lse the attention output and log-sum-exp over the keys alone,
the output with the sink column is O * sigmoid(lse - S_h) (the kept weights are scaled by
Z / (Z + e^S_h)). That lets fused kernels that never materialize scores compute it exactly:

- `flash_sink_attention` (training path): the fused CPU flash-attention kernels for forward and
  backward, with the sink's rescale and its gradient in a custom autograd function. Full layers
  use the causal kernel (no mask, O(T^2) compute and O(T) memory); sliding layers cut the
  queries into blocks of `window` that attend to their own and the previous key block with one
  shared [W, 2W] mask: O(T x W) compute and memory.
- `flex_sink_attention` (CUDA): flex_attention with a causal / sliding block mask and its
  differentiable log-sum-exp; the same rescale.
- `sink_attention`: SDPA with a float mask [N, T, S+1] and one extra all-zero key whose mask
  entry is S_h (exact; for prefill against a KV cache with arbitrary positions).

`reference_attention` spells out the math for tests.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..runtime.compat import FLASH_CPU, FLASH_CPU_BWD, flex_attention_lse, flex_compile_options
from .sink_op import register_sink_op


def causal_mask(T: int, S: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool [T, S], True where query i (absolute position S - T + i) may see key j.

    Causal: j <= pos(i). Sliding: also pos(i) - window < j, i.e. exactly `window` keys.
    """
    q_pos = torch.arange(S - T, S, device=device).unsqueeze(1)  # [T, 1]
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # [1, S]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [T, S] from absolute positions: key j visible to query i iff pos_i - window < pos_j <= pos_i.
    A key position of -1 marks an empty cache slot: never visible."""
    allowed = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)) & (k_pos.unsqueeze(0) >= 0)
    if window is not None:
        allowed &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window
    return allowed


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    window: int | None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, N, T, D], k/v [B, G, S, D], sinks [N] -> [B, N, T, D].

    Without `allowed` (bool [T, S]) the queries are the last T of the S keys' positions.
    """
    B, N, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    zero = k.new_zeros(B, G, 1, D)
    k = torch.cat([k, zero], dim=2)  # [B, G, S + 1, D] last key is the sink slot
    v = torch.cat([v, zero], dim=2)  # [B, G, S + 1, D]
    if allowed is None:
        allowed = causal_mask(T, S, window, q.device)  # [T, S]
    bias = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    mask = torch.cat(
        [bias.expand(N, T, S), sinks.to(q.dtype).view(N, 1, 1).expand(N, T, 1)], dim=-1
    )  # [N, T, S + 1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.unsqueeze(0), scale=D**-0.5, enable_gqa=(G != N)
    )


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None
) -> torch.Tensor:
    """The definition, materialized: scores, mask, sink column, softmax, drop the sink, weight V."""
    B, N, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(N // G, dim=1)  # [B, N, S, D] query head h reads kv head h // (N / G)
    v = v.repeat_interleave(N // G, dim=1)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5  # [B, N, T, S]
    scores = scores.masked_fill(~causal_mask(T, S, window, q.device), float("-inf"))
    sink_col = sinks.to(q.dtype).view(1, N, 1, 1).expand(B, N, T, 1)
    probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]  # [B, N, T, S]
    return probs @ v


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Few queries against a KV cache: q [B, N, T, D], k/v [B, G, S, D] (views of the cache, not
    copied), allowed bool [T, S] -> [B, N, T, D]. The same math as `reference_attention` without
    repeating K/V per head or appending a key column."""
    B, N, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    R = N // G
    qg = q.reshape(B, G, R * T, D)  # heads g*R .. g*R+R-1 share kv head g
    scores = (qg @ k.transpose(-1, -2)).view(B, G, R, T, S) * D**-0.5  # [B, G, R, T, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(q.dtype).view(1, G, R, 1, 1).expand(B, G, R, T, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # [B, G, R, T, S]
    out = probs.reshape(B, G, R * T, S) @ v  # [B, G, R*T, D]
    return out.view(B, N, T, D)


_FLASH_CPU, _FLASH_CPU_BWD = FLASH_CPU, FLASH_CPU_BWD


def sink_gate(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """[B, N, T] the share of the real keys, sigmoid(lse - sink), in the lse's precision."""
    return torch.sigmoid(lse - sinks.to(lse.dtype).view(1, -1, 1))


def sink_grad(g: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d sink = -sum (1 - gate) rowsum(g * out), the row sums in the gate's precision."""
    row = (g.to(gate.dtype) * out.to(gate.dtype)).sum(-1)  # [B, N, T]
    return -((1 - gate) * row).sum(dim=(0, 2)).to(sinks.dtype)


def _flash_sink(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = flash(q, k, v) * gate, gate = sigmoid(lse - sink); also returns lse and gate [B, N, T]
    (fp32, fp64 for fp64 inputs).
    q [B, N, T, D], k/v [B, G, S, D] (GQA native in the kernel)."""
    o, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)  # lse [B, N, T], >= fp32
    lse = lse.contiguous()
    gate = sink_gate(lse, sinks)
    return (o * gate.unsqueeze(-1).to(o.dtype)).contiguous(), lse, gate


def _flash_sink_backward(
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    gate: torch.Tensor,
    sinks: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flash backward with grad_out * gate and the final `out` as its output argument gives the
    exact gradients with the sink column: its row term rowsum(grad_in * out_arg) becomes
    gate x rowsum(g * out), which the extra softmax entry requires. d sink = -sum (1 - gate) rowsum(g * out)."""
    g = g.contiguous()
    g_in = g * gate.unsqueeze(-1).to(g.dtype)
    dq, dk, dv = _FLASH_CPU_BWD(g_in, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), sink_grad(g, out, gate, sinks)


# The fused CPU kernels as the custom ops gptoss_titan::flash_sink and ::flash_sink_backward.
flash_sink_op, flash_sink_backward_op = register_sink_op("flash_sink", _flash_sink, _flash_sink_backward)


def _window_block_mask(W: int, nb: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [nb, 1, W, 2W]: query i of a block sees key j of (previous block, this block) iff
    i < j <= i + W, i.e. positions pos - W < key <= pos; block 0 has no previous block."""
    i = torch.arange(W, device=device).unsqueeze(1)
    j = torch.arange(2 * W, device=device).unsqueeze(0)
    allowed = ((j > i) & (j <= i + W)).expand(nb, 1, W, 2 * W).clone()
    allowed[0, :, :, :W] = False
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=16)
def _cpu_window_mask(B: int, T: int, W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[B * nb, 1, W, 2W] the blocked sliding-window mask for a batch, built once per shape."""
    return _window_block_mask(W, math.ceil(T / W), dtype, device).repeat(B, 1, 1, 1)


def query_blocks(x: torch.Tensor, W: int) -> torch.Tensor:
    """[B, N, T, D] -> [B * nb, N, W, D]: the queries cut into blocks of W (tail zero-padded)."""
    B, N, T, D = x.shape
    nb = math.ceil(T / W)
    x = F.pad(x, (0, 0, 0, nb * W - T))
    return x.view(B, N, nb, W, D).transpose(1, 2).reshape(B * nb, N, W, D)


def unblock_queries(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The inverse of `query_blocks`: [B * nb, N, W, ...] -> [B, N, T, ...] (tail dropped)."""
    nbB, N, W = x.shape[:3]
    nb = nbB // B
    x = x.reshape(B, nb, N, W, *x.shape[3:]).transpose(1, 2)
    return x.reshape(B, N, nb * W, *x.shape[4:])[:, :, :T]


def key_blocks(x: torch.Tensor, W: int) -> torch.Tensor:
    """[B, G, T, D] -> [B * nb, G, 2W, D]: block b holds the keys of query blocks b - 1 and b."""
    B, G, T, D = x.shape
    nb = math.ceil(T / W)
    x = F.pad(x, (0, 0, W, nb * W - T))  # one empty block in front, tail padding at the end
    x = x.unfold(2, 2 * W, W)  # [B, G, nb, D, 2W] (a view: block b = keys of blocks b-1 and b)
    return x.permute(0, 2, 1, 4, 3).reshape(B * nb, G, 2 * W, D)


def fold_key_blocks(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The adjoint of `key_blocks` (gradients): [B * nb, G, 2W, D] -> [B, G, T, D], overlaps summed."""
    nbB, G, W2, D = x.shape
    nb, W = nbB // B, W2 // 2
    x = x.view(B, nb, G, 2, W, D)
    out = x.new_zeros(B, nb + 1, G, W, D)
    out[:, :nb] += x[:, :, :, 0]  # first halves: keys of the previous block
    out[:, 1:] += x[:, :, :, 1]
    return out[:, 1:].permute(0, 2, 1, 3, 4).reshape(B, G, nb * W, D)[:, :, :T]


def flash_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    window: int | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding) GQA with sinks, q [B, N, T, D], k/v [B, G, T, D] -> [B, N, T, D],
    on the fused CPU flash kernels (any dtype they take: fp32, bf16, fp16). mask: the sliding
    layers' block mask from `attention_mask` (built here when not given)."""
    B, N, T, D = q.shape
    scale = D**-0.5
    if window is None or T <= window:  # every key in reach: plain causal
        return flash_sink_op(q, k, v, sinks, True, None, scale)[0]
    W = window
    if mask is None:
        mask = _cpu_window_mask(B, T, W, q.dtype, q.device)  # [B * nb, 1, W, 2W]
    qb, kb, vb = query_blocks(q, W), key_blocks(k, W), key_blocks(v, W)
    out = flash_sink_op(qb, kb, vb, sinks, False, mask, scale)[0]  # [B * nb, N, W, D]
    return unblock_queries(out, B, T)


@functools.lru_cache(maxsize=16)
def flex_block_mask(T: int, window: int | None, device: str):
    """The causal or sliding block mask for T queries over T keys, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, qi, kj):
        ok = kj <= qi
        if window is not None:
            ok = ok & (kj > qi - window)
        return ok

    return create_block_mask(visible, None, None, T, T, device=device)


@functools.cache
def flex_kernel(device_type: str):
    """flex_attention compiled on GPU (its fused kernel); eager elsewhere (CPU forward, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    return torch.compile(flex_attention, dynamic=False, options=flex_compile_options())


def flex_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    window: int | None,
    block_mask=None,
) -> torch.Tensor:
    """The CUDA path: flex_attention (compiled) with a causal or sliding block mask, so sliding
    layers skip the blocks outside the window, and its differentiable log-sum-exp; then the sink
    rescale. Same shapes as `flash_sink_attention`. block_mask: from `attention_mask` (built
    outside compiled regions; looked up here when not given)."""
    B, N, T, D = q.shape
    G = k.shape[1]
    if block_mask is None:
        block_mask = flex_block_mask(T, window, str(q.device))
    out, lse = flex_attention_lse(flex_kernel(q.device.type), q, k, v, block_mask, D**-0.5, G != N)
    gate = sink_gate(lse, sinks)  # [B, N, T]
    return out * gate.unsqueeze(-1).to(out.dtype)


def attention_path(device: torch.device) -> str:
    """The training attention kernel for tensors on this device: "flash" (CPU's fused kernels),
    "flex" (CUDA: flex_attention, compiled) or "sdpa" (the exact masked SDPA, elsewhere). The
    fake-GPU test step forces "flex" on the CPU by patching this function."""
    return {"cpu": "flash", "cuda": "flex"}.get(device.type, "sdpa")


def attention_mask(B: int, T: int, window: int | None, device: torch.device, dtype: torch.dtype):
    """What `training_attention` needs besides q/k/v for a [B, T] batch on this device, built once
    per shape and outside compiled regions: CPU sliding layers (T > window) the blocked additive
    mask, CUDA a flex BlockMask, else None."""
    path = attention_path(device)
    if path == "flash":
        return _cpu_window_mask(B, T, window, dtype, device) if window is not None and T > window else None
    if path == "flex":
        return flex_block_mask(T, window, str(device))
    return None


def training_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None, mask=None
) -> torch.Tensor:
    """The attention used in training and full-sequence forwards, by device: fused flash kernels on
    CPU, flex_attention on CUDA, the exact masked SDPA elsewhere. mask: from `attention_mask`."""
    path = attention_path(q.device)
    if path == "flash":
        return flash_sink_attention(q, k, v, sinks, window, mask)
    if path == "flex":
        return flex_sink_attention(q, k, v, sinks, window, mask)
    return sink_attention(q, k, v, sinks, window)

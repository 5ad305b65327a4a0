"""Attention math for gpt-oss: causal (optionally sliding-window) GQA with per-head sinks.

Shape legend: B batch, N query heads, G kv heads, T queries, S keys, D head dim.

A sink is one learned logit per query head, S_h, appended to every score row as an extra column
(not scaled, not rotated, position-free). Softmax runs over the row plus that column and the sink
column is dropped, so the kept weights sum to 1 - p_sink.

`sink_attention` is the training path: SDPA with a float mask and one extra all-zero key/value
column whose mask entry is S_h. Its score is q . 0 + S_h = S_h and its value contributes nothing,
so the result is exact, the sink gradient flows through the mask, and it runs forward and
backward on CPU (flex_attention has no CPU backward). `reference_attention` spells out the math
for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Bool [T, S] from absolute positions: key j visible to query i iff pos_i - window < pos_j <= pos_i."""
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if window is not None:
        allowed &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window
    return allowed


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None,
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

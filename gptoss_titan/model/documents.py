"""Document masking for packed sequences: each token attends only to earlier tokens of its own
document (and, on sliding layers, only the last `window` of them). Documents end at <|endoftext|>.

Positions restart at every document start, so a packed document is computed exactly as if it ran
alone (the equivalence tests compare the two). RoPE rotates queries and keys by their positions,
so scores depend only on position differences: continuing the positions across documents would
give the same attention in exact arithmetic, only larger angles (less precise in bf16) - no
switch for it.

Kernels, by device:
- CPU: the fused flash kernels on each document's own slice (`doc_flash_sink` custom op):
  O(sum of squared document lengths) compute, never a T x T mask. Sliding layers cut a long
  document into window blocks as in attention.py.
- CUDA: flex_attention with a document block mask (built once per step, outside compiled code).
- Elsewhere: the exact masked SDPA per document.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..runtime.compat import FLASH_CPU, FLASH_CPU_BWD
from .attention import (
    _cpu_window_mask,
    attention_path,
    fold_key_blocks,
    key_blocks,
    query_blocks,
    sink_attention,
    sink_gate,
    sink_grad,
    unblock_queries,
)
from .local import to_device
from .sink_op import register_sink_op
from .tokens import EOT_ID


@dataclass(frozen=True)
class Documents:
    """Where the documents of a packed [B, T] batch lie.

    segments: int64 [S, 3] on the host, one row (batch row, start, end) per document piece.
    ids: int32 [B, T] document index of each token; positions: int64 [B, T] position of each token
    within its document (both on the batch's device).
    """

    segments: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor


def find_documents(
    tokens: torch.Tensor, device: torch.device | str | None = None, eot_id: int = EOT_ID
) -> Documents:
    """The documents of a host batch of token ids [B, T]: a document ends with (and includes) an
    <|endoftext|>; the next token starts a new one."""
    tokens = tokens.cpu()
    B, T = tokens.shape
    ends = tokens == eot_id
    ids = torch.zeros(B, T, dtype=torch.int64)
    ids[:, 1:] = ends[:, :-1].long().cumsum(1)  # documents started before each token
    starts_mask = torch.ones(B, T, dtype=torch.bool)
    starts_mask[:, 1:] = ends[:, :-1]
    pos = torch.arange(T).expand(B, T)
    start_of = torch.where(starts_mask, pos, torch.zeros_like(pos)).cummax(1).values  # [B, T]
    rows, starts = starts_mask.nonzero(as_tuple=True)
    stops = torch.cat([starts[1:], starts.new_tensor([T])])
    stops = torch.where(torch.cat([rows[1:] != rows[:-1], torch.ones(1, dtype=torch.bool)]), T, stops)
    segments = torch.stack([rows, starts, stops], 1)
    return Documents(segments, to_device(ids.to(torch.int32), device), to_device(pos - start_of, device))


def _segment_forward(q, k, v, window: int, scale: float):
    """Flash attention of one document slice q [1, N, L, D] over its own keys -> (out, lse [1, N, L])
    without the sink. window 0: causal over all keys."""
    L = q.shape[2]
    if window == 0 or L <= window:
        o, lse = FLASH_CPU(q, k, v, 0.0, True, scale=scale)
        return o, lse
    mask = _cpu_window_mask(1, L, window, q.dtype, q.device)
    o, lse = FLASH_CPU(
        query_blocks(q, window),
        key_blocks(k, window),
        key_blocks(v, window),
        0.0,
        False,
        attn_mask=mask,
        scale=scale,
    )
    return unblock_queries(o, 1, L), unblock_queries(lse.unsqueeze(-1), 1, L).squeeze(-1)


def _segment_backward(g, q, k, v, out, lse, window: int, scale: float):
    """The flash backward of `_segment_forward` given the final output and log-sum-exp (dq, dk, dv)."""
    L = q.shape[2]
    if window == 0 or L <= window:
        return FLASH_CPU_BWD(g, q, k, v, out, lse, 0.0, True, scale=scale)
    W = window
    mask = _cpu_window_mask(1, L, W, q.dtype, q.device)
    # Padded query rows carry no gradient; an lse of +inf gives them zero probabilities, not 0 * inf.
    lse_b = query_blocks(lse.unsqueeze(-1), W).squeeze(-1)  # [nb, N, W]
    pad = lse_b.shape[0] * W - L
    if pad:
        lse_b[-1, :, W - pad :] = float("inf")
    dq, dk, dv = FLASH_CPU_BWD(
        query_blocks(g, W),
        query_blocks(q, W),
        key_blocks(k, W),
        key_blocks(v, W),
        query_blocks(out, W),
        lse_b.contiguous(),
        0.0,
        False,
        attn_mask=mask,
        scale=scale,
    )
    return unblock_queries(dq, 1, L), fold_key_blocks(dk, 1, L), fold_key_blocks(dv, 1, L)


def _doc_flash_sink(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    segments: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-document sink attention: q [B, N, T, D], k/v [B, G, T, D], segments [S, 3] (row, start,
    end) covering every token -> (out, lse, gate) as `flash_sink_op` returns them."""
    B, N, T, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(B, N, T, D)
    lse = q.new_empty((B, N, T), dtype=acc)
    for b, s, e in segments.tolist():
        o, l_ = _segment_forward(
            q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], window, scale
        )
        out[b : b + 1, :, s:e] = o
        lse[b : b + 1, :, s:e] = l_
    gate = sink_gate(lse, sinks)
    return (out * gate.unsqueeze(-1).to(out.dtype)).contiguous(), lse, gate


def _doc_flash_sink_backward(
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    gate: torch.Tensor,
    sinks: torch.Tensor,
    segments: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `flash_sink_backward_op` (attention.py), one document at a time."""
    g = g.contiguous()
    g_in = g * gate.unsqueeze(-1).to(g.dtype)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    for b, s, e in segments.tolist():
        r = (slice(b, b + 1), slice(None), slice(s, e))
        dq[r], dk[r], dv[r] = _segment_backward(g_in[r], q[r], k[r], v[r], out[r], lse[r], window, scale)
    return dq, dk, dv, sink_grad(g, out, gate, sinks)


doc_flash_sink_op, doc_flash_sink_backward_op = register_sink_op(
    "doc_flash_sink", _doc_flash_sink, _doc_flash_sink_backward
)


@functools.cache
def block_mask_builder(compiled: bool):
    """create_block_mask, compiled (once: the document ids are an input, not a guard): eager, it
    evaluates the mask on all [B, T, T] positions, a few GB at 128k tokens, every step."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=False) if compiled else create_block_mask


def flex_document_mask(docs: Documents, window: int | None, device: str, compiled: bool | None = None):
    """The flex BlockMask of a packed batch: causal, same document, within the window; built by
    compiled code on CUDA (compiled None), eagerly elsewhere unless asked."""
    create_block_mask = block_mask_builder(device.startswith("cuda") if compiled is None else compiled)
    ids = docs.ids
    B, T = ids.shape

    def visible(b, h, qi, kj):
        ok = (kj <= qi) & (ids[b, qi] == ids[b, kj])
        if window is not None:
            ok = ok & (kj > qi - window)
        return ok

    return create_block_mask(visible, B, None, T, T, device=device)


def document_masks(docs: Documents, windows: set, device: torch.device) -> dict:
    """window -> what the attention of a packed batch takes: a flex document block mask where
    training attention runs flex (CUDA), else the Documents themselves (`document_attention`)."""
    if attention_path(device) == "flex":
        return {w: flex_document_mask(docs, w, str(device)) for w in windows}
    return dict.fromkeys(windows, docs)


def document_attention(q, k, v, sinks, window: int | None, docs: Documents) -> torch.Tensor:
    """Sink attention inside each document, q [B, N, T, D], k/v [B, G, T, D] -> [B, N, T, D]:
    the CPU custom op, or (other devices but CUDA, which uses flex) the masked SDPA per document."""
    scale = q.shape[-1] ** -0.5
    if attention_path(q.device) == "flash":
        return doc_flash_sink_op(q, k, v, sinks, docs.segments, window or 0, scale)[0]
    rows = []
    for b in range(q.shape[0]):
        seg = docs.segments[docs.segments[:, 0] == b].tolist()
        rows.append(
            torch.cat(
                [
                    sink_attention(
                        q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], sinks, window
                    )
                    for _, s, e in seg
                ],
                dim=2,
            )
        )
    return torch.cat(rows, 0)

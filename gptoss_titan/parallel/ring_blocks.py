"""One (query piece, key piece) pair of ring attention (parallel/ring_attention.py), by device.

Shape legend as in model/attention.py; Lq / Lk: the pair's query / key rows. A pair's partial
output o and log-sum-exp l are without the sink; the ring merges them by their log-sum-exp.

Pieces of a layout are disjoint ranges, so a pair is one of: keys after the queries (skipped, from
the ranges alone), keys before them (all visible), or the same piece (causal). Documents add
"same document" on top, from the ids on the device.

Three kernels (`block_kernel`):
- "cpu": the fused CPU flash kernels. The pair's mask is classified on the host (skip, none,
  causal, or an explicit [Lq, Lk] mask), and backward runs the flash backward with the final
  (merged, gated) output and log-sum-exp, which gives each pair's exact share of the gradient.
- "flex" (CUDA): compiled flex_attention returning its log-sum-exp; causal and document pairs get
  a block mask (documents: built by compiled create_block_mask from the ids on the device), so no
  pair reads the device from the host and no [Lq, Lk] scores exist: memory follows the pieces'
  length, not its square. Rows that see no key come back with l = -inf.
- "math" (other devices, and the tests' stand-in for flex on CPU, where flex has no backward): the
  same contract with the scores of one pair materialized.
"flex" and "math" recompute the pair in backward under autograd and feed it the gradients of
o and l that the merge and the sink gate give (`recompute_backward`): with w = exp(l - lse),
g_in = g * gate and Dfinal = rowsum(g_in * out): do = w * g_in, dl = w * (rowsum(g_in * o) - Dfinal).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..model.attention import flex_block_mask, flex_kernel
from ..model.documents import block_mask_builder
from ..runtime.compat import FLASH_CPU, FLASH_CPU_BWD, autograd_in_custom_op, flex_attention_lse

_NEG = float("-inf")


def block_kernel(t: torch.Tensor) -> str:
    """The pair kernel for tensors on this device: "cpu", "flex" (CUDA) or "math" (tests force
    the others by patching this function)."""
    return {"cpu": "cpu", "cuda": "flex"}.get(t.device.type, "math")


class Pair(NamedTuple):
    """A pair with visible keys: local query rows, held key columns, and its mask (the CPU kernel's
    classified mask, or for flex / math: diag and the pieces' document ids on the device)."""

    rows: slice
    cols: slice
    mask: object


class DeviceMask(NamedTuple):
    diag: bool  # the same piece: causal
    q_ids: torch.Tensor | None  # [B, Lq] document ids of the queries (None: no documents)
    k_ids: torch.Tensor | None  # [B, Lk]
    key: tuple = ()  # (ids, q range, k range): what the block mask depends on (its cache key)


def cpu_pair_mask(q_rng: tuple[int, int], k_rng: tuple[int, int], ids: torch.Tensor | None, device):
    """Which keys of piece k_rng the queries of piece q_rng see (causal, same document), for the CPU
    kernel: "skip" (none), None (all), "causal" (the same piece, no documents), or bool
    [B|1, 1, Lq, Lk] on `device` (reads the ids: a host read, free on CPU)."""
    (qs, qe), (ks, ke) = q_rng, k_rng
    if ks > qe - 1:
        return "skip"
    if ids is None:
        if ke - 1 <= qs:
            return None
        if (qs, qe) == (ks, ke):
            return "causal"
    dev = ids.device if ids is not None else device
    qpos, kpos = torch.arange(qs, qe, device=dev), torch.arange(ks, ke, device=dev)
    m = (kpos[None, :] <= qpos[:, None]).unsqueeze(0)  # [1, Lq, Lk]
    if ids is not None:
        m = m & (ids[:, qs:qe, None] == ids[:, None, ks:ke])  # [B, Lq, Lk]
    if not bool(m.any()):
        return "skip"
    if bool(m.all()):
        return None
    return m.unsqueeze(1).to(device)


def device_pair_mask(q_rng: tuple[int, int], k_rng: tuple[int, int], ids: torch.Tensor | None):
    """The flex / math kernels' mask of a pair, from the ranges and device slices only (no host read
    of the device): "skip" or a DeviceMask."""
    (qs, qe), (ks, ke) = q_rng, k_rng
    if ks > qe - 1:
        return "skip"
    diag = (qs, qe) == (ks, ke)
    if not diag and ke > qs:
        raise ValueError(f"ring attention: pieces {q_rng} and {k_rng} overlap")
    if ids is None:
        return DeviceMask(diag, None, None)
    return DeviceMask(diag, ids[:, qs:qe], ids[:, ks:ke], (ids, q_rng, k_rng))


def _additive(mask, dtype) -> torch.Tensor | None:
    if not isinstance(mask, torch.Tensor):
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, _NEG)


def cpu_forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair on the fused CPU kernel -> (out [B, N, Lq, D], lse [B, N, Lq]; -inf where no key)."""
    o, lse = FLASH_CPU(q, k, v, 0.0, mask == "causal", attn_mask=_additive(mask, q.dtype), scale=scale)
    if isinstance(mask, torch.Tensor):
        lse = lse.masked_fill(~mask.any(-1), _NEG)  # the kernel reports 0 for rows without keys
    return o, lse


def cpu_backward(g_in, q, k, v, out, lse, mask, scale: float):
    """(dq, dk, dv) of one pair given the final (merged, gated) out and log-sum-exp and g * gate."""
    return FLASH_CPU_BWD(
        g_in, q, k, v, out, lse, 0.0, mask == "causal", attn_mask=_additive(mask, q.dtype), scale=scale
    )


def _visible(m: DeviceMask, Lq: int, Lk: int, device) -> torch.Tensor | None:
    """Bool [B|1, 1, Lq, Lk] of the math kernel (None: every key visible)."""
    ok = None
    if m.diag:
        ok = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()[None, None]
    if m.q_ids is not None:
        same = (m.q_ids[:, :, None] == m.k_ids[:, None, :]).unsqueeze(1)
        ok = same if ok is None else ok & same
    return ok


def math_forward(q, k, v, m: DeviceMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (o, l) of one pair with its scores materialized (fp32 or wider); rows without a
    visible key give o = 0 and l = -inf, with finite gradients."""
    N, G = q.shape[1], k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.repeat_interleave(N // G, dim=1).to(acc).transpose(-1, -2)) * scale
    ok = _visible(m, q.shape[2], k.shape[2], q.device)
    if ok is not None:
        s = s.masked_fill(~ok, _NEG)
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)
    z = e.sum(-1, keepdim=True)
    o = (e / z.clamp_min(torch.finfo(acc).tiny)) @ v.repeat_interleave(N // G, dim=1).to(acc)
    lse = torch.where(z > 0, top + torch.log(z.clamp_min(torch.finfo(acc).tiny)), _NEG).squeeze(-1)
    return o.to(q.dtype), lse


def _doc_pair_mask(m: DeviceMask, B: int, Lq: int, Lk: int, device: str):
    """The flex BlockMask of a document pair: same document (and causal on the diagonal), built by
    compiled create_block_mask on CUDA from the ids on the device (an input, not a guard)."""
    create_block_mask = block_mask_builder(device.startswith("cuda"))
    q_ids, k_ids = m.q_ids, m.k_ids
    if m.diag:

        def visible(b, h, qi, kj):
            return (kj <= qi) & (q_ids[b, qi] == k_ids[b, kj])
    else:

        def visible(b, h, qi, kj):
            return q_ids[b, qi] == k_ids[b, kj]

    return create_block_mask(visible, B, None, Lq, Lk, device=device)


class _MaskCache:
    """The document pairs' block masks of the current batch: built once, then reused by every full
    layer's forward and backward. Holds the batch's ids tensor, so its memory cannot be reused by
    another tensor while cached; a new ids tensor (or an in-place change) starts over."""

    def __init__(self):
        self.ids: torch.Tensor | None = None
        self.tag: tuple = ()
        self.masks: dict = {}

    def get(self, m: DeviceMask, build):
        ids, q_rng, k_rng = m.key
        tag = (ids.untyped_storage().data_ptr(), ids.storage_offset(), tuple(ids.shape), ids._version)
        if self.ids is None or tag != self.tag:
            self.ids, self.tag, self.masks = ids, tag, {}
        if (q_rng, k_rng) not in self.masks:
            self.masks[(q_rng, k_rng)] = build()
        return self.masks[(q_rng, k_rng)]


_MASKS = _MaskCache()


def flex_forward(q, k, v, m: DeviceMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, l) of one pair by flex_attention (compiled on CUDA), differentiable in o and l."""
    B, Lq, Lk, dev = q.shape[0], q.shape[2], k.shape[2], str(q.device)
    if m.q_ids is not None:
        block_mask = _MASKS.get(m, lambda: _doc_pair_mask(m, B, Lq, Lk, dev))
    else:
        block_mask = flex_block_mask(Lq, None, dev) if m.diag else None
    return flex_attention_lse(
        flex_kernel(q.device.type), q, k, v, block_mask, scale, k.shape[1] != q.shape[1]
    )


FORWARD = {"math": math_forward, "flex": flex_forward}


def recompute_backward(kind: str, g_in, q, k, v, lse, d_final, m: DeviceMask, scale: float):
    """(dq, dk, dv) of one flex / math pair: recompute (o, l) under autograd and back-propagate the
    merge's gradients (module notes). g_in = g * gate, lse the merged log-sum-exp [B, N, Lq] and
    d_final = rowsum(g_in * out) [B, N, Lq] (fp32 or wider)."""
    with autograd_in_custom_op():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        o, l_ = FORWARD[kind](qq, kk, vv, m, scale)
        w = torch.exp(l_.detach().to(lse.dtype) - lse).nan_to_num(0.0)  # [B, N, Lq]
        g_o = (w.unsqueeze(-1) * g_in.to(lse.dtype)).to(o.dtype)
        # rowsum(g_o * o) from the rounded g_o: the same term the kernel's backward subtracts
        g_l = (g_o.to(lse.dtype) * o.detach().to(lse.dtype)).sum(-1) - w * d_final
        return torch.autograd.grad((o, l_), (qq, kk, vv), (g_o, g_l.to(l_.dtype)))

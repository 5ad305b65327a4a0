"""Exact attention with sinks over a sequence split across the context-parallel (cp) ranks.

Each cp rank holds some contiguous pieces of every sequence (`pieces[r]`: (start, end) global
positions, in the order its local tokens are laid out). Shape legend as in model/attention.py;
L: local tokens of a rank.

Full layers - ring attention (`ring_sink` custom op). K and V travel once around the ring
(rank r sends to r + 1 while it computes on the block it holds, so the transfer overlaps the
compute). Each (query piece, key piece) pair runs the fused flash kernel without the sink:
skipped when no key is visible, unmasked when all are, causal when the pieces coincide, with an
explicit [Lq, Lk] mask otherwise (uneven pieces, documents). Partial outputs merge by their
log-sum-exp; the sink is applied once after the merge: out * sigmoid(lse - sink). Backward: K, V
go round again with their gradient accumulators, which arrive back at their owner after the last
hop; each pair's flash backward uses the final output and log-sum-exp (exact, like the one-rank
kernel in attention.py), and the sink gradient is -sum (1 - gate) rowsum(g * out) per rank.

Sliding layers need only the `window - 1` keys before each piece: `halo_keys` fetches exactly
those from their owners with one all-to-all (autograd-aware, so their gradients go back the same
way), never a ring; then the blocked sliding kernel runs on halo + piece.

CPU runs the fused flash kernels; other devices a plain-math block kernel (exact; scores of one
block pair materialized) - the same code path, forced in tests. Not yet fast on GPUs: that block
kernel, and with document masking one host sync per block pair (the mask's classification), are
what a CUDA flash/flex block kernel would replace; without documents the ring never syncs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.attention import sink_gate, sink_grad
from ..model.sink_op import register_sink_op
from ..runtime.compat import FLASH_CPU, FLASH_CPU_BWD, all_to_all_single_autograd

_NEG = float("-inf")


def fused_kernels(t: torch.Tensor) -> bool:
    """The fused CPU flash kernels for tensors on this device (else the plain-math block kernel;
    tests force that path by patching this function)."""
    return t.device.type == "cpu"


def _pair_mask(q_rng: tuple[int, int], k_rng: tuple[int, int], ids: torch.Tensor | None, device):
    """Which keys of piece k_rng the queries of piece q_rng see (causal, same document):
    "skip" (none), None (all), "causal" (the same piece, no documents), or bool [B|1, 1, Lq, Lk]
    on `device`. Without documents this is decided from the ranges alone; with documents it reads
    the ids (on a GPU a host sync per block pair: see the module notes)."""
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


def _additive(mask, dtype) -> torch.Tensor | None:
    if not isinstance(mask, torch.Tensor):
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, _NEG)


def _math_scores(q, k, mask, scale):
    N, G = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(N // G, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ kk.to(acc).transpose(-1, -2)) * scale  # [B, N, Lq, Lk]
    if isinstance(mask, str):  # "causal"
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), _NEG)
    elif mask is not None:
        s = s.masked_fill(~mask, _NEG)
    return s


def block_forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair without the sink -> (out [B, N, Lq, D], lse [B, N, Lq]; -inf where a row sees no key)."""
    if fused_kernels(q):
        o, lse = FLASH_CPU(q, k, v, 0.0, mask == "causal", attn_mask=_additive(mask, q.dtype), scale=scale)
    else:
        s = _math_scores(q, k, mask, scale)
        lse = s.logsumexp(-1)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        o = (p @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1).to(p.dtype)).to(q.dtype)
    if isinstance(mask, torch.Tensor):
        lse = lse.masked_fill(~mask.any(-1), _NEG)  # the kernel reports 0 for rows without keys
    return o, lse


def block_backward(g, q, k, v, out, lse, mask, scale: float):
    """(dq, dk, dv) of one pair given the final (merged, gated) out and log-sum-exp and g * gate."""
    if fused_kernels(q):
        return FLASH_CPU_BWD(
            g, q, k, v, out, lse, 0.0, mask == "causal", attn_mask=_additive(mask, q.dtype), scale=scale
        )
    N, G = q.shape[1], k.shape[1]
    s = _math_scores(q, k, mask, scale)
    p = torch.exp(s - lse.unsqueeze(-1))  # [B, N, Lq, Lk]
    acc = p.dtype
    vv = v.repeat_interleave(N // G, dim=1).to(acc)
    dv = (p.transpose(-1, -2) @ g.to(acc)).unflatten(1, (G, N // G)).sum(2)
    dp = g.to(acc) @ vv.transpose(-1, -2)
    ds = p * (dp - (g.to(acc) * out.to(acc)).sum(-1, keepdim=True))
    dq = (ds @ k.repeat_interleave(N // G, dim=1).to(acc)) * scale
    dk = ((ds.transpose(-1, -2) @ q.to(acc)) * scale).unflatten(1, (G, N // G)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _lengths(pieces: list) -> list[int]:
    return [e - s for s, e in pieces]


def _offsets(pieces: list) -> list[int]:
    out, o = [], 0
    for s, e in pieces:
        out.append(o)
        o += e - s
    return out


def _pairs(mine: list, theirs: list, doc_ids, device):
    """(query rows, key columns, mask) of every (local piece, held piece) pair with visible keys."""
    for qr, qo in zip(mine, _offsets(mine)):
        for kr, ko in zip(theirs, _offsets(theirs)):
            mask = _pair_mask(qr, kr, doc_ids, device)
            if not (isinstance(mask, str) and mask == "skip"):
                yield slice(qo, qo + qr[1] - qr[0]), slice(ko, ko + kr[1] - kr[0]), mask


class _Ring:
    """Send to the next cp rank, receive from the previous one (asynchronously)."""

    def __init__(self, group_name: str):
        self.group = dist.distributed_c10d._resolve_process_group(group_name)
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def start(self, send: torch.Tensor, recv_shape) -> tuple[list, torch.Tensor]:
        buf = send.new_empty(recv_shape)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, buf, self.prev, self.group),
        ]
        return dist.batch_isend_irecv(ops), buf


def _layout(pieces_t: torch.Tensor, ids_t: torch.Tensor):
    pieces = [[tuple(p) for p in r] for r in pieces_t.tolist()]
    return pieces, (ids_t if ids_t.numel() else None)


def _ring_sink(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    pieces: torch.Tensor,
    ids: torch.Tensor,
    group_name: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full causal attention with sinks of the local queries over the keys of all cp ranks.
    q [B, N, L, D], k/v [B, G, L, D] (this rank's pieces), pieces int64 [cp, P, 2] (every rank's
    (start, end) ranges), ids [B, T] document index per global position (or empty: no documents)
    -> (out, lse, gate) as the one-rank op returns them."""
    ring = _Ring(group_name)
    layout, doc_ids = _layout(pieces, ids)
    mine = layout[ring.rank]
    B, N, L, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(B, N, L, D, dtype=acc, device=q.device)
    lse = torch.full((B, N, L), _NEG, dtype=acc, device=q.device)
    kv = torch.stack([k, v]).contiguous()  # [2, B, G, L, D]
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        if step < ring.size - 1:
            nxt = layout[(src - 1) % ring.size]
            reqs, buf = ring.start(kv, (2, B, k.shape[1], sum(_lengths(nxt)), D))
        for rows, cols, mask in _pairs(mine, layout[src], doc_ids, q.device):
            o, l_ = block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], mask, scale)
            new = torch.logaddexp(lse[:, :, rows], l_.to(acc))
            a = torch.exp(lse[:, :, rows] - new).nan_to_num(0.0).unsqueeze(-1)
            b = torch.exp(l_.to(acc) - new).nan_to_num(0.0).unsqueeze(-1)
            out[:, :, rows] = out[:, :, rows] * a + o.to(acc) * b
            lse[:, :, rows] = new
        if step < ring.size - 1:
            for r in reqs:
                r.wait()
            kv = buf
    gate = sink_gate(lse, sinks)
    return (out * gate.unsqueeze(-1)).to(q.dtype).contiguous(), lse, gate


def _ring_sink_backward(
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    gate: torch.Tensor,
    sinks: torch.Tensor,
    pieces: torch.Tensor,
    ids: torch.Tensor,
    group_name: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ring = _Ring(group_name)
    layout, doc_ids = _layout(pieces, ids)
    mine = layout[ring.rank]
    B, N, L, D = q.shape
    G = k.shape[1]
    g = g.contiguous()
    g_in = g * gate.unsqueeze(-1).to(g.dtype)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(B, N, L, D, dtype=acc, device=q.device)
    kv = torch.stack([k, v]).contiguous()
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # gradients of the keys held now
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        if step < ring.size - 1:
            nxt = layout[(src - 1) % ring.size]
            reqs, buf = ring.start(kv, (2, B, G, sum(_lengths(nxt)), D))
        for rows, cols, mask in _pairs(mine, layout[src], doc_ids, q.device):
            dq_, dk_, dv_ = block_backward(
                g_in[:, :, rows].contiguous(),
                q[:, :, rows].contiguous(),
                kv[0][:, :, cols].contiguous(),
                kv[1][:, :, cols].contiguous(),
                out[:, :, rows].contiguous(),
                lse[:, :, rows].contiguous(),
                mask,
                scale,
            )
            dq[:, :, rows] += dq_
            dkv[0][:, :, cols] += dk_
            dkv[1][:, :, cols] += dv_
        # The accumulated gradients follow their keys; after the last step they reach the owner.
        greqs, gbuf = ring.start(dkv, (2, B, G, sum(_lengths(layout[(src - 1) % ring.size])), D))
        if step < ring.size - 1:
            for r in reqs:
                r.wait()
            kv = buf
        for r in greqs:
            r.wait()
        dkv = gbuf
    dsink = sink_grad(g, out, gate, sinks)
    return dq.to(q.dtype), dkv[0].to(k.dtype, copy=True), dkv[1].to(v.dtype, copy=True), dsink


# The custom ops gptoss_titan::ring_sink and ::ring_sink_backward.
ring_sink_op, ring_sink_backward_op = register_sink_op("ring_sink", _ring_sink, _ring_sink_backward)


def halo_plan(pieces: list[list[tuple[int, int]]], window: int, rank: int):
    """For sliding layers: which local rows this rank sends to each cp rank (the keys in the
    `window - 1` positions before each of that rank's pieces that this rank holds), how many it
    receives from each, and, per own piece, the global positions of its halo (ascending) with their
    row in the received buffer. Static for a layout."""
    owner = {}
    for r, ps in enumerate(pieces):
        for (s, e), o in zip(ps, _offsets(ps)):
            for p in range(s, e):
                owner[p] = (r, o + p - s)
    need = [[list(range(max(0, s - window + 1), s)) for s, _ in ps] for ps in pieces]  # per rank, per piece
    send_rows, send_counts = [], []
    for d in range(len(pieces)):
        rows = [owner[p][1] for piece in need[d] for p in piece if owner[p][0] == rank]
        send_rows += rows
        send_counts.append(len(rows))
    recv_counts, recv_index = [], []
    base = 0
    for src in range(len(pieces)):
        n = 0
        for i, piece in enumerate(need[rank]):
            for p in piece:
                if owner[p][0] == src:
                    recv_index.append((i, p, base + n))
                    n += 1
        recv_counts.append(n)
        base += n
    halos = [sorted((p, row) for i, p, row in recv_index if i == j) for j in range(len(need[rank]))]
    return send_rows, send_counts, recv_counts, [[row for _, row in h] for h in halos]


def halo_keys(kv: torch.Tensor, plan, group) -> list[torch.Tensor]:
    """kv [B, G, L, 2D] (keys and values of the local tokens) -> per own piece the halo's
    [B, G, H, 2D] from their owners, by one all-to-all whose gradient flows back to them."""
    send_rows, send_counts, recv_counts, halos = plan
    rows = torch.tensor(send_rows, dtype=torch.long, device=kv.device)
    send = kv.index_select(2, rows).permute(2, 0, 1, 3).contiguous()  # [S, B, G, 2D]
    recv = all_to_all_single_autograd(send, recv_counts, send_counts, group)  # [R, B, G, 2D]
    recv = recv.permute(1, 2, 0, 3)  # [B, G, R, 2D]
    return [recv.index_select(2, torch.tensor(h, dtype=torch.long, device=kv.device)) for h in halos]

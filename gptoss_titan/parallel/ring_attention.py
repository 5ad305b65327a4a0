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

The block kernel of a pair depends on the device (parallel/ring_blocks.py): the fused CPU flash
kernels, compiled flex_attention on CUDA (block masks from the device's document ids: no host
sync, no [Lq, Lk] scores), plain math elsewhere. The gradients of the keys and values travel in
their input dtype, and each hop's transfer overlaps the next pair's compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.attention import sink_gate, sink_grad
from ..model.sink_op import register_sink_op
from ..runtime.compat import all_to_all_single_autograd
from . import ring_blocks
from .ring_blocks import Pair, cpu_backward, cpu_pair_mask, device_pair_mask, recompute_backward

_NEG = float("-inf")


def _lengths(pieces: list) -> list[int]:
    return [e - s for s, e in pieces]


def _offsets(pieces: list) -> list[int]:
    out, o = [], 0
    for s, e in pieces:
        out.append(o)
        o += e - s
    return out


def _pairs(kind: str, mine: list, theirs: list, doc_ids, device):
    """Every (local piece, held piece) Pair with visible keys, its mask for the `kind` kernel."""
    for qr, qo in zip(mine, _offsets(mine)):
        for kr, ko in zip(theirs, _offsets(theirs)):
            if kind == "cpu":
                mask = cpu_pair_mask(qr, kr, doc_ids, device)
            else:
                mask = device_pair_mask(qr, kr, doc_ids)
            if not (isinstance(mask, str) and mask == "skip"):
                yield Pair(slice(qo, qo + qr[1] - qr[0]), slice(ko, ko + kr[1] - kr[0]), mask)


class _Ring:
    """Send to the next cp rank, receive from the previous one (asynchronously)."""

    def __init__(self, group_name: str):
        self.group = dist.distributed_c10d._resolve_process_group(group_name)
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def start(self, send: torch.Tensor, recv_shape, tag: int = 0) -> tuple[list, torch.Tensor]:
        """tag: 0 keys and values, 1 their gradients (gloo matches by tag; NCCL by order)."""
        buf = send.new_empty(recv_shape)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, buf, self.prev, self.group, tag),
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
    kind = ring_blocks.block_kernel(q)
    forward = ring_blocks.cpu_forward if kind == "cpu" else ring_blocks.FORWARD[kind]
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
        for rows, cols, mask in _pairs(kind, mine, layout[src], doc_ids, q.device):
            o, l_ = forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], mask, scale)
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
    kind = ring_blocks.block_kernel(q)
    B, N, L, D = q.shape
    G = k.shape[1]
    g = g.contiguous()
    g_in = g * gate.unsqueeze(-1).to(g.dtype)
    acc = torch.promote_types(q.dtype, torch.float32)
    d_final = None if kind == "cpu" else (g_in.to(acc) * out.to(acc)).sum(-1)  # [B, N, L]
    dq = torch.zeros(B, N, L, D, dtype=acc, device=q.device)
    kv = torch.stack([k, v]).contiguous()
    incoming = None  # (requests, buffer): the gradient of the held keys from the ranks before
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        nxt = layout[(src - 1) % ring.size]
        if step < ring.size - 1:
            reqs, buf = ring.start(kv, (2, B, G, sum(_lengths(nxt)), D))
        part = torch.zeros(kv.shape, dtype=acc, device=q.device)  # this rank's share for the held keys
        for rows, cols, mask in _pairs(kind, mine, layout[src], doc_ids, q.device):
            qr, kc, vc = (
                q[:, :, rows].contiguous(),
                kv[0][:, :, cols].contiguous(),
                kv[1][:, :, cols].contiguous(),
            )
            if kind == "cpu":
                o_r, l_r = out[:, :, rows].contiguous(), lse[:, :, rows].contiguous()
                dq_, dk_, dv_ = cpu_backward(g_in[:, :, rows].contiguous(), qr, kc, vc, o_r, l_r, mask, scale)
            else:
                dq_, dk_, dv_ = recompute_backward(
                    kind, g_in[:, :, rows], qr, kc, vc, lse[:, :, rows], d_final[:, :, rows], mask, scale
                )
            dq[:, :, rows] += dq_
            part[0][:, :, cols] += dk_
            part[1][:, :, cols] += dv_
        # The held keys' gradient arrived while this step computed; it follows its keys on, in
        # their dtype, and is only waited for after the next step's compute. After the last step
        # every key's gradient is back at its owner.
        if incoming is not None:
            for r in incoming[0]:
                r.wait()
            part += incoming[1]
        send = part.to(k.dtype)
        if ring.size == 1:  # one rank: its own keys' gradient is complete
            incoming = ([], send)
            break
        incoming = ring.start(send, (2, B, G, sum(_lengths(nxt)), D), tag=1)
        if step < ring.size - 1:
            for r in reqs:
                r.wait()
            kv = buf
    for r in incoming[0]:
        r.wait()
    dkv = incoming[1]
    dsink = sink_grad(g, out, gate, sinks)
    return dq.to(q.dtype), dkv[0].clone(), dkv[1].clone(), dsink


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

"""Context parallelism (cp): every sequence is split across the cp ranks of a data-parallel group.

Layout (`CPLayout.balanced`): the T tokens are cut into 2 x cp chunks and rank r holds chunks r
and 2cp - 1 - r, so each rank does the same share of causal attention work. RoPE uses the global
positions (or, with document masking, the positions inside each document, computed on the whole
sequence before the split). The cp ranks read the same batch and join the FSDP shard group
(dims.py); the loss and the token count are summed over every rank, so any layout gives the
update of one process.

The model stays unaware: the trainer passes a `CPBatch` where it would pass a document layout;
the model's attention asks it to `attend` (full layers: the ring op, sliding layers: a halo
exchange then the blocked sliding kernel, both in ring_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.attention import flash_sink_op, key_blocks, query_blocks, unblock_queries
from ..model.documents import Documents
from ..model.local import to_device
from . import ring_blocks
from .ring_attention import _offsets, halo_keys, halo_plan, ring_sink_op


class CPLayout:
    """Which global positions each cp rank holds: pieces[r] = ((start, end), ...) in local order,
    and the halo exchange plans of the sliding windows (built once, outside compiled code).
    table: int64 [cp, P, 2], the ring op's argument (every rank holds the same number of pieces).
    A plain class: Dynamo rebuilds frozen dataclasses, which derived fields do not survive."""

    def __init__(self, T: int, pieces, windows: tuple[int, ...] = ()):
        self.T = T
        self.pieces = tuple(tuple(tuple(p) for p in ps) for ps in pieces)
        self.table = torch.tensor(self.pieces, dtype=torch.long)
        lists = [list(p) for p in self.pieces]
        self.halos = {(w, r): halo_plan(lists, w, r) for w in windows for r in range(self.cp)}

    @classmethod
    def balanced(cls, T: int, cp: int, windows: tuple[int, ...] = ()) -> CPLayout:
        if T % (2 * cp):
            raise ValueError(
                f"sequence length {T} is not divisible by 2 x context_parallel_degree = {2 * cp}"
            )
        C = T // (2 * cp)
        pieces = tuple(((r * C, (r + 1) * C), ((2 * cp - 1 - r) * C, (2 * cp - r) * C)) for r in range(cp))
        return cls(T, pieces, windows)

    @property
    def cp(self) -> int:
        return len(self.pieces)

    def index(self, rank: int) -> torch.Tensor:
        """int64 [L]: the global positions of rank's local tokens, in order."""
        return torch.cat([torch.arange(s, e) for s, e in self.pieces[rank]])


@dataclass(eq=False)
class CPBatch:
    """One rank's share of a batch: RoPE positions [B, L] of its tokens, the document index of every
    global position [B, T] (None without document masking), the layout, its rank and the cp
    process group's name."""

    positions: torch.Tensor
    ids: torch.Tensor | None
    layout: CPLayout
    rank: int
    group: str

    def attend(self, q, k, v, sinks, window: int | None) -> torch.Tensor:
        """q [B, N, L, D], k/v [B, G, L, D] of the local tokens -> [B, N, L, D]."""
        scale = q.shape[-1] ** -0.5
        if window is None:
            ids = self.ids if self.ids is not None else q.new_empty(0, dtype=torch.long)
            return ring_sink_op(q, k, v, sinks, self.layout.table, ids, self.group, scale)[0]
        return self._sliding(q, k, v, sinks, window, scale)

    def _sliding(self, q, k, v, sinks, W: int, scale: float) -> torch.Tensor:
        B, N, L, D = q.shape
        kv = torch.cat([k, v], dim=-1)  # [B, G, L, 2D]: one exchange for both
        halos = halo_keys(kv, self.layout.halos[(W, self.rank)], self.group)
        mine = self.layout.pieces[self.rank]
        outs = []
        for (s, e), o, halo in zip(mine, _offsets(mine), halos):
            H = halo.shape[2]
            ext = torch.cat([halo, kv[:, :, o : o + e - s]], dim=2)  # positions s - H .. e - 1
            k_ext, v_ext = ext[..., :D], ext[..., D:]
            q_ext = F.pad(q[:, :, o : o + e - s], (0, 0, H, 0))  # halo rows: computed, then dropped
            ids = self.ids[:, s - H : e] if self.ids is not None else None
            allowed = window_blocks(torch.arange(s - H, e, device=q.device), ids, W, B)  # [B*nb, 1, W, 2W]
            out = blocked_sink_attention(
                query_blocks(q_ext, W), key_blocks(k_ext, W), key_blocks(v_ext, W), sinks, allowed, scale
            )
            outs.append(unblock_queries(out, B, H + e - s)[:, :, H:])
        return torch.cat(outs, dim=2)


def window_blocks(pos: torch.Tensor, ids: torch.Tensor | None, W: int, B: int) -> torch.Tensor:
    """Bool [B * nb, 1, W, 2W] for the blocked sliding kernel over tokens at positions pos [T]
    (ids [B, T] their documents): key visible iff pos_q - W < pos_k <= pos_q (and same document)."""
    T = pos.shape[0]
    p = (pos + 1).view(1, 1, T, 1).to(torch.float64)  # 0 marks padding after blocking
    qp = query_blocks(p, W)[:, 0, :, 0]  # [nb, W]
    kp = key_blocks(p, W)[:, 0, :, 0]  # [nb, 2W]
    ok = (kp[:, None, :] > 0) & (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] > qp[:, :, None] - W)
    ok = ok.unsqueeze(1).repeat(B, 1, 1, 1)  # [B * nb, 1, W, 2W]
    if ids is not None:
        d = (ids + 1).view(B, 1, T, 1).to(torch.float64)
        qd, kd = query_blocks(d, W)[:, 0, :, 0], key_blocks(d, W)[:, 0, :, 0]
        ok &= (qd[:, :, None] == kd[:, None, :]).unsqueeze(1)
    return ok


def blocked_sink_attention(qb, kb, vb, sinks, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Sink attention of query blocks over their key blocks with a bool mask [Bn, 1, W, 2W]: the
    fused CPU op, or elsewhere SDPA with the sink as one extra zero key whose mask entry is the sink."""
    if ring_blocks.block_kernel(qb) == "cpu":
        mask = torch.zeros(allowed.shape, dtype=qb.dtype, device=qb.device).masked_fill_(
            ~allowed, float("-inf")
        )
        return flash_sink_op(qb, kb, vb, sinks, False, mask, scale)[0]
    Bn, N, W, D = qb.shape
    G = kb.shape[1]
    zero = kb.new_zeros(Bn, G, 1, D)
    bias = torch.zeros(allowed.shape, dtype=qb.dtype, device=qb.device).masked_fill_(~allowed, float("-inf"))
    mask = torch.cat(
        [bias.expand(Bn, N, W, 2 * W), sinks.to(qb.dtype).view(1, N, 1, 1).expand(Bn, N, W, 1)], -1
    )
    return F.scaled_dot_product_attention(
        qb, torch.cat([kb, zero], 2), torch.cat([vb, zero], 2), attn_mask=mask, scale=scale, enable_gqa=G != N
    )


def split_batch(
    x: torch.Tensor, y: torch.Tensor, docs: Documents | None, layout: CPLayout, rank: int, group, device
) -> tuple[torch.Tensor, torch.Tensor, CPBatch]:
    """A host batch [B, T] -> this rank's tokens and targets [B, L] and its CPBatch (on device);
    group: the cp process group's name."""
    idx = layout.index(rank)
    B = x.shape[0]
    if docs is not None:  # (found on the host: indexed there, copied once, asynchronously on CUDA)
        positions = to_device(docs.positions.cpu()[:, idx], device)
        ids = to_device(docs.ids.cpu().long(), device)
    else:
        positions, ids = to_device(idx, device).expand(B, -1), None
    return x[:, idx].contiguous(), y[:, idx].contiguous(), CPBatch(positions, ids, layout, rank, group)

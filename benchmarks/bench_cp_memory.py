#!/usr/bin/env python3
"""Context parallelism: peak memory of one ring block pair (forward + backward) as the sequence grows.

  python benchmarks/bench_cp_memory.py [--cp 4] [--seqs 2048,4096,8192,16384] [--heads 16]
                                       [--kv_heads 2] [--head_dim 64] [--documents] [--device cpu|cuda]

One pair of pieces of a balanced layout (T / (2 cp) tokens each), the same piece (causal) or with
--documents the keys of an earlier piece under a document mask, through each pair kernel of
parallel/ring_blocks.py that the device has: on CPU "cpu" (fused flash) and "math" (scores
materialized); on CUDA "flex" (compiled; the path CUDA runs) and "math". CPU flex is not measured:
it has no backward and its eager forward is a materializing reference, not the fused kernel.
Peak: on CUDA torch.cuda.max_memory_allocated above the inputs; on CPU the largest sum of live
tensors the pair's ops allocated (a dispatch mode watching their storages; kernel workspaces are
not seen). A kernel whose memory follows the block size grows 2x per doubling of T; one that
holds [Lq, Lk] scores 4x.
"""

from __future__ import annotations

import argparse

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from gptoss_titan.parallel import ring_blocks
from gptoss_titan.parallel.ring_blocks import DeviceMask


class LiveBytes(TorchDispatchMode):
    """The peak total size of the storages that ops allocated inside the mode and that are still alive."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.live.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def pair_inputs(L: int, a: argparse.Namespace, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, a.heads, L, a.head_dim, generator=g, dtype=dtype, device=device)
    k = torch.randn(1, a.kv_heads, L, a.head_dim, generator=g, dtype=dtype, device=device)
    v = torch.randn(1, a.kv_heads, L, a.head_dim, generator=g, dtype=dtype, device=device)
    go = torch.randn(q.shape, generator=g, dtype=dtype, device=device)
    if not a.documents:
        return q, k, v, go, "causal", DeviceMask(True, None, None)
    ids_q = (torch.arange(L, device=device) * 4 // L + 1).view(1, L)  # 4 documents in the queries
    ids_k = (torch.arange(L, device=device) * 4 // L).view(1, L)  # the keys end with 3 of them
    cpu_mask = (ids_q[:, :, None] == ids_k[:, None, :]).unsqueeze(1)
    return q, k, v, go, cpu_mask, DeviceMask(False, ids_q, ids_k)


def run_pair(kind: str, q, k, v, go, cpu_mask, dev_mask) -> None:
    scale = q.shape[-1] ** -0.5
    if kind == "cpu":
        o, lse = ring_blocks.cpu_forward(q, k, v, cpu_mask, scale)
        ring_blocks.cpu_backward(go, q, k, v, o, lse.nan_to_num(0.0, neginf=0.0), cpu_mask, scale)
        return
    with torch.no_grad():
        o, lse = ring_blocks.FORWARD[kind](q, k, v, dev_mask, scale)
    d_final = (go.float() * o.float()).sum(-1)
    ring_blocks.recompute_backward(kind, go, q, k, v, lse.float(), d_final, dev_mask, scale)


def measure(kind: str, L: int, a: argparse.Namespace) -> float:
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    inputs = pair_inputs(L, a, dtype, a.device)
    if a.device == "cuda":
        run_pair(kind, *inputs)  # compile first
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_pair(kind, *inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveBytes() as tracker:
        run_pair(kind, *inputs)
    return tracker.peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--seqs", default="2048,4096,8192,16384")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--documents", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    kinds = ["flex", "math"] if a.device == "cuda" else ["cpu", "math"]
    print(
        f"one pair, {'documents' if a.documents else 'causal'}, {a.heads}/{a.kv_heads} heads of {a.head_dim}, cp {a.cp}, {a.device}"
    )
    print(f"{'T':>7} {'piece':>6} " + " ".join(f"{k:>10}" for k in kinds) + "   (peak MiB)")
    for T in (int(s) for s in a.seqs.split(",")):
        L = T // (2 * a.cp)
        row = [measure(k, L, a) for k in kinds]
        print(f"{T:>7} {L:>6} " + " ".join(f"{m:>10.1f}" for m in row))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""MoE scaling: a training step (forward + backward + AdamW) with E experts vs 8, same active size.

  python benchmarks/bench_moe.py [--experts 64] [--flavor bench] [--batch 4] [--seq 512] [--steps 8]
                                 [--no_keep_freed] [--no_blas_batch]

Two copies of the flavor that differ only in the number of experts (top-k and expert size equal,
so every token does the same work) train alternately on the same batches in one process; the
median step times, their ratio and the split forward+backward / optimizer are printed. Compute
tracks the active parameters; AdamW necessarily touches every parameter.

As in the trainer on CPU, malloc keeps freed memory (training.cpu_keep_freed_memory;
--no_keep_freed turns that off) and many small experts run as one batched BLAS call
(model.expert_kernel "auto" -> "batched", model/blas_batch.py; --no_blas_batch keeps the loop of GEMMs).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from gptoss_titan.model import FLAVORS, Transformer
from gptoss_titan.model.moe import resolve_expert_kernel
from gptoss_titan.runtime.distributed import keep_freed_cpu_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--flavor", default="bench", choices=sorted(FLAVORS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no_keep_freed", action="store_true", help="leave glibc malloc's defaults")
    p.add_argument("--no_blas_batch", action="store_true", help="a loop of GEMMs for the experts")
    a = p.parse_args()
    kept = not a.no_keep_freed and keep_freed_cpu_memory()
    base = FLAVORS[a.flavor]
    models, kernels = {}, {}
    for e in (base.num_experts, a.experts):
        m = Transformer(dataclasses.replace(base, num_experts=e))
        m.init_weights(seed=0)
        rows = a.batch * a.seq * base.top_k
        kernels[e] = (
            "loop" if a.no_blas_batch else resolve_expert_kernel("auto", "cpu", torch.float32, e, rows)[0]
        )
        m.set_expert_kernel(kernels[e])
        models[e] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True))
    times = {e: {"fwd_bwd": [], "opt": []} for e in models}
    for i in range(a.steps):
        tokens = torch.randint(
            0, base.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(i)
        )
        for e, (m, opt) in models.items():
            t0 = time.perf_counter()
            ce_sum, _, _ = m(tokens[:, :-1], tokens[:, 1:])
            (ce_sum / tokens[:, 1:].numel()).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if i > 0:  # the first step is a warm-up
                times[e]["fwd_bwd"].append(t1 - t0)
                times[e]["opt"].append(t2 - t1)
    print(
        f"{a.flavor} flavor, top {base.top_k}, batch {a.batch} x {a.seq}, fp32, {torch.get_num_threads()} threads; "
        f"malloc keeps freed memory: {kept}; expert kernels: {kernels}"
    )
    med = {}
    for e, (m, _) in models.items():
        fb, op = statistics.median(times[e]["fwd_bwd"]), statistics.median(times[e]["opt"])
        med[e] = fb + op
        n = sum(x.numel() for x in m.parameters())
        print(
            f"{e:3d} experts ({n / 1e6:6.1f}M params): step {med[e] * 1e3:7.1f} ms = forward+backward "
            f"{fb * 1e3:7.1f} + AdamW {op * 1e3:6.1f}"
        )
    small, big = base.num_experts, a.experts
    print(f"step time {big} / {small} experts: {med[big] / med[small]:.3f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Attention forward + backward: our fused paths vs the dense-masked equivalents, one process.

  python benchmarks/bench_attention.py [--seq 4096] [--window 128] [--batch 1] [--heads 64]
                                       [--kv_heads 8] [--head_dim 64] [--dtype fp32|bf16] [--repeats 3]

Rows (each the best of --repeats, forward + backward of all inputs, sinks included):
- ours sliding: `flash_sink_attention` with the window (blocked, O(T x W));
- ours full causal: the same kernel without a window (what a sliding layer would cost at O(T^2));
- dense-masked sliding: SDPA with the full [N, T, T+1] float mask carrying the window and sinks
  (the exact "mask everything" equivalent);
- transformers-style eager: scores, mask, sink column with cat, softmax, drop, weight V.
Default shapes are one kv group of gpt-oss's attention (8 query heads sharing 1 kv head, head dim
64, window 128); the dense-masked rows need O(N T^2) memory (about 0.5 GiB per query head at T 4096).
"""

from __future__ import annotations

import argparse
import time

import torch

from gptoss_titan.model.attention import flash_sink_attention, reference_attention, sink_attention


def timed(fn, q, k, v, s, window, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        x = [t.detach().requires_grad_() for t in (q, k, v, s)]
        t0 = time.perf_counter()
        out = fn(*x, window)
        out.backward(torch.ones_like(out))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=1)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_eager", action="store_true", help="skip the (slow, memory-hungry) eager row")
    a = p.parse_args()
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(a.batch, a.heads, a.seq, a.head_dim, generator=g).to(dt)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, generator=g).to(dt)
    v = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, generator=g).to(dt)
    s = torch.randn(a.heads, generator=g).to(dt)
    with torch.no_grad():  # the paths agree before they are timed
        err = (
            flash_sink_attention(q, k, v, s, a.window).float() - sink_attention(q, k, v, s, a.window).float()
        )
    rows = {
        "ours sliding (blocked flash)": timed(flash_sink_attention, q, k, v, s, a.window, a.repeats),
        "ours full causal (flash)": timed(flash_sink_attention, q, k, v, s, None, a.repeats),
        "dense-masked sliding (SDPA)": timed(sink_attention, q, k, v, s, a.window, a.repeats),
    }
    if not a.no_eager:
        rows["eager sliding (transformers-style)"] = timed(
            reference_attention, q, k, v, s, a.window, a.repeats
        )
    print(
        f"attention fwd+bwd, batch {a.batch}, T {a.seq}, window {a.window}, {a.heads} heads / {a.kv_heads} kv, "
        f"head dim {a.head_dim}, {a.dtype}, {torch.get_num_threads()} threads; "
        f"max |ours - masked| = {err.abs().max().item():.2e}"
    )
    base = rows["ours sliding (blocked flash)"]
    for name, t in rows.items():
        print(f"{name:36s}{t * 1e3:10.1f} ms  {t / base:6.1f}x ours sliding")


if __name__ == "__main__":
    main()

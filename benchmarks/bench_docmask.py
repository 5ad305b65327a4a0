#!/usr/bin/env python3
"""Document masking: full-attention layers over packed documents cost in proportion to the sum of
squared document lengths, not T^2. One process, side by side, forward + backward, sinks included.

  python benchmarks/bench_docmask.py [--seq 8192] [--doc 512] [--heads 8] [--kv_heads 1]
                                     [--head_dim 64] [--window 128] [--repeats 3]

Rows: full layer unmasked (`flash_sink_attention`, causal over all T keys); full layer with document
masking (`document_attention`, documents of --doc tokens); the same two for a sliding layer
(--window), where the window already bounds the cost.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptoss_titan.model.attention import flash_sink_attention
from gptoss_titan.model.documents import document_attention, find_documents
from gptoss_titan.model.tokens import EOT_ID


def best_of(fn, inputs, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        x = [t.detach().requires_grad_() for t in inputs]
        t0 = time.perf_counter()
        out = fn(*x)
        out.backward(torch.ones_like(out))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--doc", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=1)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    T = a.seq
    tokens = torch.zeros(1, T, dtype=torch.long)
    tokens[0, a.doc - 1 :: a.doc] = EOT_ID
    docs = find_documents(tokens)
    q = torch.randn(1, a.heads, T, a.head_dim)
    k, v = torch.randn(2, 1, a.kv_heads, T, a.head_dim).unbind(0)
    s = torch.randn(a.heads)
    print(
        f"seq {T}, {len(docs.segments)} documents of {a.doc}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, "
        f"threads {torch.get_num_threads()}"
    )
    for name, window in (("full", None), (f"sliding {a.window}", a.window)):
        plain = best_of(
            lambda q, k, v, s, w=window: flash_sink_attention(q, k, v, s, w), (q, k, v, s), a.repeats
        )
        masked = best_of(
            lambda q, k, v, s, w=window: document_attention(q, k, v, s, w, docs), (q, k, v, s), a.repeats
        )
        print(
            f"{name:>12}: unmasked {plain * 1e3:8.1f} ms   document-masked {masked * 1e3:8.1f} ms   "
            f"speed-up {plain / masked:5.2f}x"
        )


if __name__ == "__main__":
    main()

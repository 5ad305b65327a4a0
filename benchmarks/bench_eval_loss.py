#!/usr/bin/env python3
"""Validation time per batch: the fused lm_head + loss under torch.no_grad now (one GEMM per chunk)
against before (autograd's needs_input_grad stays True under no_grad, so the two gradient GEMMs
and their buffers ran too), side by side in one process.

  python benchmarks/bench_eval_loss.py [--flavor debug] [--batch 4] [--seq 256] [--repeats 10]

Both variants run the whole model's validation forward on the same batch; medians after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gptoss_titan.model.loss as loss_module
from gptoss_titan.model import FLAVORS, Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    args = FLAVORS[a.flavor]
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    real_apply = loss_module._FusedLinearCrossEntropy.apply

    def before(h, w, t, chunk, path, start, combine, grad):  # the old behaviour: gradient work always
        return real_apply(h, w, t, chunk, path, start, combine, True)

    times: dict[str, list[float]] = {"now": [], "before": []}
    losses = {}
    for i in range(a.repeats + 1):
        for name in ("now", "before"):
            loss_module._FusedLinearCrossEntropy.apply = real_apply if name == "now" else before
            t0 = time.perf_counter()
            with torch.no_grad():
                ce = model(x, y)[0]
            if i:
                times[name].append(time.perf_counter() - t0)
            losses[name] = float(ce)
    loss_module._FusedLinearCrossEntropy.apply = real_apply
    now, old = (statistics.median(times[k]) * 1000 for k in ("now", "before"))
    print(f"{a.flavor} flavor, {a.batch} x {a.seq} tokens, validation forward: now {now:.1f} ms per batch, "
          f"before {old:.1f} ms ({old / now:.2f}x); losses {losses['now']:.6f} / {losses['before']:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()

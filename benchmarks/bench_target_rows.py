#!/usr/bin/env python3
"""Training step time (forward + backward) with the lm_head and loss on the counted rows alone
(`target_rows`, what train/batching.py passes) against all rows, side by side in one process.

  python benchmarks/bench_target_rows.py [--flavor debug] [--batch 8] [--seq 128] [--counted 0.125]

--counted: the share of positions whose target counts (the rest IGNORE_INDEX, as a chat batch's
prompts): 0.125 is the bundled arithmetic chat task's (128 of 1,024 per step of grpo_debug.toml's
warm start). Both variants run on the same batch; medians after a warm-up, and the largest
relative difference of the losses (rounding: the same rows, GEMMs of another height).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptoss_titan.model import FLAVORS, Transformer
from gptoss_titan.model.loss import IGNORE_INDEX


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--counted", type=float, default=0.125)
    p.add_argument("--repeats", type=int, default=8)
    a = p.parse_args()
    args = FLAVORS[a.flavor]
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (a.batch, a.seq), generator=g)
    y = torch.randint(0, args.vocab_size, (a.batch, a.seq), generator=g)
    counted = torch.rand(a.batch, a.seq, generator=g) < a.counted
    y = torch.where(counted, y, IGNORE_INDEX)
    rows = counted.reshape(-1).nonzero().squeeze(1)
    times: dict[str, list[float]] = {"all rows": [], "counted rows": []}
    losses: dict[str, float] = {}
    for i in range(a.repeats + 1):
        for name, r in (("all rows", None), ("counted rows", rows)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            ce = model(x, y, target_rows=r)[0]
            ce.backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            losses[name] = float(ce.detach())
    before, now = (statistics.median(times[k]) for k in ("all rows", "counted rows"))
    print(f"{a.flavor}, {a.batch} x {a.seq} tokens, {int(counted.sum())} counted ({a.counted:.3f}):")
    print(f"  all rows     {before * 1e3:8.1f} ms per forward + backward")
    print(f"  counted rows {now * 1e3:8.1f} ms  ({before / now:.2f}x faster)")
    diff = abs(losses["counted rows"] - losses["all rows"]) / abs(losses["all rows"])
    print(f"  summed loss relative difference {diff:.1e}")


if __name__ == "__main__":
    main()

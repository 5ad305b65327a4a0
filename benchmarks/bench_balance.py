#!/usr/bin/env python3
"""Expert balancing on the README's debug run: how soon every layer is balanced, at what loss.

  python benchmarks/bench_balance.py [--seeds 0 1 2] [--steps 200] RULE:RATE[:BALANCED] ...

Each RULE:RATE (rule sign or proportional, model.load_balance_bias_update; rate
model.load_balance_bias_rate; BALANCED model.balanced_routing, 0 = off when left out) runs
`./scripts/run_train.sh` (the debug config, 4 layers of 8 experts, top-2) once per seed,
logging every 5 steps. Reported per run: the worst layer's
max / mean expert load at each logged step from step 30 on (1.0 = uniform, 4.0 = every token on
2 of 8 experts), the first logged step from which every layer stays <= 1.5, and the validation
loss at the last step; then the mean over seeds.

  python benchmarks/bench_balance.py --cost

times model.balanced_routing's assignment (balanced_topk, E rounds) per routed batch at the
debug run's shape and at 20b's and 120b's expert counts, beside the plain top-k, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(rule: str, rate: str, balanced: str, seed: int, steps: int, work: Path) -> dict:
    dump = work / f"{rule}_{rate}_{balanced}_{seed}"
    shutil.rmtree(dump, ignore_errors=True)
    argv = [
        f"--job.dump_folder={dump}",
        f"--training.seed={seed}",
        f"--training.steps={steps}",
        "--model.load_balance_bias=true",
        f"--model.load_balance_bias_update={rule}",
        f"--model.load_balance_bias_rate={rate}",
        f"--model.balanced_routing={balanced}",
        "--metrics.log_freq=5",
        "--metrics.sample_freq=0",
    ]
    r = subprocess.run(
        ["./scripts/run_train.sh", *argv], cwd=ROOT, capture_output=True, text=True, env=os.environ
    )
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    worst = {
        x["step"]: max(m / mean for m, mean in zip(x["expert_load_max"], x["expert_load_mean"]))
        for x in rows
        if "expert_load_max" in x
    }
    late = {s: w for s, w in worst.items() if s >= 30}
    balanced_from = next(
        (s for s in sorted(worst) if all(w <= 1.5 for t, w in worst.items() if t >= s)), None
    )
    val = [x["val_loss"] for x in rows if "val_loss" in x]
    fallback = [x["step"] for x in rows if x.get("balanced_routing_layers")]
    shutil.rmtree(dump, ignore_errors=True)
    return {
        "worst_from_30": max(late.values()),
        "balanced_from": balanced_from,
        "val_loss": val[-1],
        "last_fallback": fallback[-1] if fallback else None,
    }


def cost() -> None:
    import time

    import torch

    from gptoss_titan.model.balanced_routing import balanced_topk

    for M, E, k, what in (
        (1024, 8, 2, "debug run"),
        (8192, 32, 4, "20b experts"),
        (8192, 128, 4, "120b experts"),
    ):
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(M, E, generator=g) * 0.01 + torch.randn(E, generator=g) * 5  # collapsed
        for name, fn in (
            ("top-k", lambda s, k: s.topk(k)),
            ("balanced_topk", lambda s, k: balanced_topk(s, k)),
        ):
            fn(scores, k)
            t0 = time.perf_counter()
            for _ in range(5):
                fn(scores, k)
            ms = (time.perf_counter() - t0) / 5 * 1e3
            print(f"{what}: {M} tokens, {E} experts, top-{k}: {name} {ms:.2f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*")
    p.add_argument("--cost", action="store_true", help="time the balanced assignment instead")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--work", default="/tmp/bench_balance")
    a = p.parse_args()
    if a.cost:
        return cost()
    work = Path(a.work)
    for variant in a.variants:
        rule, rate, balanced = (variant + ":0").split(":")[:3]
        results = [run(rule, rate, balanced, s, a.steps, work) for s in a.seeds]
        for s, r in zip(a.seeds, results):
            print(f"{variant} seed {s}: worst max/mean from step 30 {r['worst_from_30']:.2f}, every layer <= 1.5 "
                  f"from step {r['balanced_from']}, val loss {r['val_loss']:.4f}, last logged step with a "
                  f"fallback {r['last_fallback']}", flush=True)  # fmt: skip
        print(
            f"{variant} mean over seeds: worst {statistics.mean(r['worst_from_30'] for r in results):.2f}, "
            f"val loss {statistics.mean(r['val_loss'] for r in results):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Context parallelism on long sequences: one process vs cp ranks, per-rank peak memory and step time.

  python benchmarks/bench_context_parallel.py [--seq 32768] [--cp 4] [--steps 3] [--ac none|full]
                                              [--document_mask] [--section.field=value ...]

Runs the trainer on the debug flavor (max_seq_len raised to --seq) with one sequence per step,
once on one process and once with torchrun on --cp processes and context_parallel_degree = --cp,
and reads rank 0's metrics.jsonl: the peak resident memory of the last step's window (the trainer
resets the peak after each log line) and the median step time after the first step.

On a 2-core machine the cp processes share the two cores (one thread each, vs two threads for the
single process), so the step time compares the work, not a speed-up: with cp ranks on their own
devices each does 1/cp of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, a: argparse.Namespace, dump: Path) -> dict:
    args = [
        "-m",
        "gptoss_titan.train",
        "--config",
        str(ROOT / "train_configs" / "debug_model.toml"),
        f"--training.seq_len={a.seq}",
        f"--model.args.max_seq_len={a.seq}",
        "--training.local_batch_size=1",
        f"--training.steps={a.steps}",
        "--metrics.log_freq=1",
        "--metrics.sample_freq=0",
        "--validation.enable=false",
        "--checkpoint.enable=false",
        f"--activation_checkpoint.mode={a.ac}",
        f"--training.document_mask={str(a.document_mask).lower()}",
        f"--parallelism.context_parallel_degree={nproc}",
        f"--job.dump_folder={dump}",
        *a.extra,
    ]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"run failed ({nproc} processes):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "tokens_per_s" in x]
    return {
        "peak_gib": steps[-1]["mem_peak_rss_gib"],
        "step_s": statistics.median(a.seq / x["tokens_per_s"] for x in steps[1:]),
        "loss": steps[-1]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ac", default="none", choices=["none", "full"])
    p.add_argument("--document_mask", action="store_true")
    a, a.extra = p.parse_known_args()  # anything else: trainer options for both runs
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, a, Path(tmp) / "one")
        cp = run(a.cp, a, Path(tmp) / "cp")
    print(f"debug flavor, seq {a.seq:,}, 1 sequence per step, AC {a.ac}, document mask {a.document_mask}")
    print(f"{'':<14}{'peak GiB/rank':>14}{'step s':>10}{'loss':>10}")
    for name, r in (("1 process", one), (f"cp {a.cp}", cp)):
        print(f"{name:<14}{r['peak_gib']:>14.3f}{r['step_s']:>10.2f}{r['loss']:>10.4f}")
    print(f"cp {a.cp} per-rank peak = {cp['peak_gib'] / one['peak_gib']:.1%} of one process")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The dry run's memory plan of a LoRA run against a measured CPU run of a 20b-shaped stack: 20b's
widths, experts, heads and vocabulary, a few layers.

  python benchmarks/lora_memory.py [--layers 2] [--seq 1024] [--rank 16] [--base_format mxfp4]

1. A Hugging Face folder of random weights of that shape (experts as MXFP4 blocks and scales, the
   rest bf16) is written to --work (deleted afterwards).
2. Estimate: the dry run's sum for one rank (parallel/dry_run.py: planned_gib) with the CPU loss
   path's chunks, computing in fp32 as a CPU run does.
3. Measurement: `./scripts/run_train.sh` (one process) on the bundled KJV corpus for --steps steps,
   logging every step, with glibc's default malloc (--keep_freed: the trainer's default, which
   keeps freed memory for reuse, so the peak also holds the heap's fragmentation); metrics.jsonl's mem_peak_rss_gib of each step after the first (the
   window starts after the previous log line, so it holds the step's own peak over what stays
   resident), minus the resident size of a process that imported the trainer (libraries and
   interpreter, no tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--base_format", default="mxfp4", choices=["mxfp4", "auto"])
    p.add_argument("--work", default="/tmp/lora_memory")
    p.add_argument(
        "--keep_freed",
        action="store_true",
        help="the trainer's default malloc settings (freed memory kept for reuse)",
    )
    return p.parse_args()


def write_base(folder: Path, args) -> None:
    """Random weights in the released layout: MXFP4 experts (scales near 2^-6), bf16 elsewhere."""
    from safetensors.torch import save_file

    from gptoss_titan.model.hf import hf_config, name_pairs
    from gptoss_titan.model.mxfp4 import quantize_mxfp4

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args, "bfloat16")))
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for i, (_, name, shape) in enumerate(name_pairs(args)):
        if name.endswith(("gate_up_proj", "down_proj")):
            parts = [
                quantize_mxfp4(torch.randn((1, *shape[1:]), generator=g) * 0.02) for _ in range(shape[0])
            ]
            tensors = {
                f"{name}_blocks": torch.cat([b for b, _ in parts]),
                f"{name}_scales": torch.cat([s for _, s in parts]),
            }
        else:
            tensors = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)}
        save_file(tensors, str(folder / f"part{i}.safetensors"))
        weight_map.update({k: f"part{i}.safetensors" for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def overrides(o: argparse.Namespace, base: Path, dump: Path) -> list[str]:
    return [
        "--model.flavor=20b",
        f"--model.args.n_layers={o.layers}",
        "--model.load_balance_bias=false",
        f"--training.seq_len={o.seq}",
        "--training.local_batch_size=1",
        "--training.global_batch_size=1",
        f"--training.steps={o.steps}",
        "--training.mixed_precision_param=float32",
        "--training.document_mask=false",
        f"--lora.rank={o.rank}",
        f"--lora.alpha={2 * o.rank}",
        "--lora.targets=attention,experts",
        f"--lora.base_format={o.base_format}",
        f"--checkpoint.initial_load_path={base}",
        "--checkpoint.initial_load_format=hf",
        "--checkpoint.enable=false",
        "--activation_checkpoint.mode=full",
        "--validation.enable=false",
        "--metrics.log_freq=1",
        "--metrics.sample_freq=0",
        f"--job.dump_folder={dump}",
        f"--training.cpu_keep_freed_memory={str(o.keep_freed).lower()}",
    ]


def main() -> None:
    o = parse()
    from gptoss_titan.config import model_args, parse_args
    from gptoss_titan.parallel.dry_run import planned_gib

    work = Path(o.work)
    shutil.rmtree(work, ignore_errors=True)
    argv = ["--config", str(ROOT / "train_configs/debug_model.toml")]
    try:
        cfg = parse_args(argv + overrides(o, work / "hf", work / "run"))
        write_base(work / "hf", model_args(cfg))
        estimate = planned_gib(cfg, 1, accel=False)
        # VmRSS, not ru_maxrss: a child's maximum carries this process's over exec
        code = (
            "import gptoss_titan.train, pathlib; print(next(l.split()[1] for l in "
            "pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:')))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
        idle = int(out) / 2**20  # kB -> GiB
        env = {**os.environ, "NGPU": "1", "CONFIG_FILE": "train_configs/debug_model.toml"}
        r = subprocess.run(
            ["./scripts/run_train.sh", *overrides(o, work / "hf", work / "run")], cwd=ROOT, env=env, text=True,
            capture_output=True,
        )  # fmt: skip
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in rows if "mem_peak_rss_gib" in x and x["step"] > 1]
        peak = max(x["mem_peak_rss_gib"] for x in steps)
        measured = peak - idle
        print(
            f"20b-shaped stack, {o.layers} layers, rank {o.rank} (attention, experts), base {o.base_format}, "
            f"{o.seq} tokens, full AC, fp32 compute, 1 CPU process"
        )
        print(f"dry-run estimate {estimate:.3f} GiB; measured {measured:.3f} GiB (peak RSS {peak:.3f} GiB of steps "
              f"2-{o.steps}, less {idle:.3f} GiB of an idle process); estimate / measured = {estimate / measured:.3f}")  # fmt: skip
        print(
            f"tokens/s: {[round(x['tokens_per_s'], 1) for x in steps]}; malloc keeps freed memory: {o.keep_freed}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

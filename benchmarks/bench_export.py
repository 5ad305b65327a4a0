"""Export of a gpt-oss-20b-shaped checkpoint: time, bytes/s and peak RSS stay streaming.

A synthetic DCP checkpoint with the 20b flavor's tensor shapes (hidden 2880, 32 experts of 2880,
the 201,088-token vocabulary) but only --layers layers is written in bf16, then exported by
`scripts/convert_dcp_to_safetensors.py` (bf16 and --quantize mxfp4), each in a fresh process whose
peak RSS GNU time reports (the checkpoint is written by another process). The exporter loads one tensor at a time and writes
a shard when it is full, so peak RSS should be about one shard (--max_shard_size, 2GB here) plus
one tensor, whatever the number of layers: compare --layers 1 and 3 (the real 20b has 24).

    python benchmarks/bench_export.py --layers 1 3 --workdir /tmp/bench_export [--max_shard_size 2GB]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptoss_titan.model import FLAVORS  # noqa: E402
from gptoss_titan.model.hf import name_pairs  # noqa: E402


def synthetic_checkpoint(folder: Path, layers: int) -> int:
    args = dataclasses.replace(FLAVORS["20b"], n_layers=layers)
    gen = torch.Generator().manual_seed(0)
    state = {
        f"model.{native}": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for native, _, shape in name_pairs(args)
    }
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    (folder / "model_args.json").write_text(json.dumps(args.to_dict()))
    return sum(t.numel() * t.element_size() for t in state.values())


def export(step: Path, out: Path, *extra: str) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of one export in its own process, measured by GNU time (a process
    forked from this one would inherit this one's high-water mark)."""
    script = str(ROOT / "scripts/convert_dcp_to_safetensors.py")
    cmd = [
        "/usr/bin/time",
        "-f",
        "peak_rss_kib %M",
        sys.executable,
        script,
        "--checkpoint",
        str(step),
        *extra,
    ]
    t0 = time.perf_counter()
    r = subprocess.run(
        [*cmd, "--output", str(out), "--quiet", *extra], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    kib = int(r.stderr.split("peak_rss_kib")[-1])
    return seconds, kib / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--workdir", default="/tmp/bench_export")
    p.add_argument("--max_shard_size", default="2GB", help="the exporter's --max-shard-size")
    p.add_argument("--make", help=argparse.SUPPRESS)  # (internal: write one checkpoint, print its bytes)
    a = p.parse_args()
    if a.make:
        print(synthetic_checkpoint(Path(a.make), a.layers[0]))
        return
    work = Path(a.workdir)
    rows = []
    for layers in a.layers:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        step = work / "step-0"
        make = [sys.executable, __file__, "--make", str(step), "--layers", str(layers)]
        ckpt_bytes = int(subprocess.run(make, check=True, capture_output=True, text=True).stdout.split()[-1])
        for name, extra in (("mxfp4", ("--quantize", "mxfp4")), ("bf16", ())):
            out = work / name
            seconds, rss = export(step, out, "--max-shard-size", a.max_shard_size, *extra)
            written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append(
                (layers, name, ckpt_bytes / 2**30, written / 2**30, seconds, written / seconds / 2**20, rss)
            )
            shutil.rmtree(out)
    shutil.rmtree(work, ignore_errors=True)
    print("| layers | export | checkpoint GiB | written GiB | seconds | MiB/s written | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]:.2f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""MXFP4-aware training: how much of the MXFP4 export's loss gap does training with
`training.mxfp4_qat` close? One script, the debug flavor on the bundled KJV corpus.

  python benchmarks/bench_mxfp4_qat.py [--pretrain 150] [--finetune 50] [--val_batches 16]

1. Pretrain the debug model for --pretrain steps (fp32).
2. Fine-tune it for --finetune more steps twice from that checkpoint: plainly, and with
   --training.mxfp4_qat=true (same data, seed and schedule).
3. Validation loss (the same --val_batches x 256 tokens of KJV's validation split) of
   (a) the plain fine-tune in full precision, (b) its MXFP4 export, (c) the MXFP4 export of the
   QAT fine-tune. The export's experts are the quantize-dequantized weights bit for bit
   (tests/interop/test_export.py), so (b) and (c) apply that quantize-dequantize in memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def train(dump: Path, steps: int, *extra: str) -> None:
    cmd = [
        sys.executable, "-m", "gptoss_titan.train", "--config", str(ROOT / "train_configs" / "debug_model.toml"),
        f"--training.steps={steps}", f"--job.dump_folder={dump}", "--checkpoint.enable=true",
        f"--checkpoint.interval={steps}", "--metrics.sample_freq=0", "--validation.enable=false", *extra,
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode:
        sys.exit(f"training failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


@torch.no_grad()
def val_loss(step_dir: Path, val: np.ndarray, batches: int, quantized: bool) -> float:
    from gptoss_titan.checkpoint import read_model_args
    from gptoss_titan.model import Transformer
    from gptoss_titan.model.mxfp4 import quantize_dequantize
    from tests.checkpoint.test_manager import weights

    m = Transformer(read_model_args(step_dir))
    m.init_weights()
    m.load_state_dict(weights(step_dir))
    m.eval()
    if quantized:
        for layer in m.layers:
            for w in (layer.moe.experts.w_gate_up, layer.moe.experts.w_down):
                w.copy_(quantize_dequantize(w))
    total, count = 0.0, 0
    for i in range(batches):
        chunk = torch.from_numpy(val[i * 256 : i * 256 + 257].astype(np.int64))
        ce, _, _ = m(chunk[None, :-1], chunk[None, 1:])
        total, count = total + float(ce), count + 256
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", type=int, default=150)
    p.add_argument("--finetune", type=int, default=50)
    p.add_argument("--val_batches", type=int, default=16)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from gptoss_titan.data import resolve_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train(tmp / "base", a.pretrain)
        base = tmp / "base" / "checkpoint" / f"step-{a.pretrain}"
        runs = {}
        for name, extra in (("plain", ()), ("qat", ("--training.mxfp4_qat=true",))):
            train(
                tmp / name,
                a.finetune,
                f"--checkpoint.initial_load_path={base}",
                "--lr_scheduler.warmup_steps=5",
                *extra,
            )
            runs[name] = tmp / name / "checkpoint" / f"step-{a.finetune}"
        val = np.fromfile(resolve_dataset("kjv", "", "o200k_harmony") / "val.bin", dtype=np.uint32)
        rows = {
            "(a) plain fine-tune, full precision": val_loss(runs["plain"], val, a.val_batches, False),
            "(b) plain fine-tune, MXFP4 export": val_loss(runs["plain"], val, a.val_batches, True),
            "(c) QAT fine-tune, MXFP4 export": val_loss(runs["qat"], val, a.val_batches, True),
            "(d) QAT fine-tune, full precision": val_loss(runs["qat"], val, a.val_batches, False),
        }
    print(
        f"debug flavor, pretrain {a.pretrain} steps, fine-tune {a.finetune}; val loss over {a.val_batches} x 256 tokens"
    )
    for k, v in rows.items():
        print(f"{k:<40}{v:>10.4f}")
    gap_b = rows["(b) plain fine-tune, MXFP4 export"] - rows["(a) plain fine-tune, full precision"]
    gap_c = rows["(c) QAT fine-tune, MXFP4 export"] - rows["(a) plain fine-tune, full precision"]
    print(
        f"MXFP4 gap: plain {gap_b:+.4f}, QAT {gap_c:+.4f} ({1 - gap_c / gap_b:.0%} of the gap closed)"
        if gap_b
        else ""
    )


if __name__ == "__main__":
    main()

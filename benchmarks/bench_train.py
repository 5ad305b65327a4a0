#!/usr/bin/env python3
"""Training speed: our model vs transformers' GptOssForCausalLM, side by side in one process.

  python benchmarks/bench_train.py [--flavor bench] [--dtype fp32|bf16] [--batch 4] [--seq 512]
                                   [--steps 8] [--num_experts N] [--memory] [--no_trainer] [--keep_freed]

Both models get the same weights (through our Hugging Face mapping) and the same batches; each
step is forward + backward + AdamW (the same fused AdamW for both). The models run alternately,
step by step, so a slow phase of a shared machine hits both; the medians after two warm-up steps
are compared. Also timed: our trainer's real `train_step()` (data, loss normalization, clipping,
optimizer, LR schedule, metrics) on the same shapes. Achieved GFLOP/s use the model's
window-aware FLOPs per token; "% peak" is against an n^3 matmul measured in this run.

--dtype bf16: transformers with bf16 weights; ours as the trainer runs it (bf16 autocast over
fp32 master weights, the loss in fp32), and ours with bf16 weights too.
--memory: runs each model alone in a fresh process (Linux) and reports the peak RSS of two steps
(the peak is reset after the build and a first step) and how much the steps add on top of the
model + optimizer state.
--num_experts: change the number of experts (top-k and expert size unchanged: same active size).
--keep_freed: malloc keeps freed memory for reuse, as our trainer does by default on CPU
(training.cpu_keep_freed_memory). It is process-wide, so it applies to both models; without it
(the default here, how transformers runs out of the box) our trainer row runs with it off too.
It speeds transformers up far more than us (its eager attention allocates score matrices above
glibc's 32 MiB mmap threshold, which page-fault in on every step): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptoss_titan.model import FLAVORS, ModelArgs, Transformer
from gptoss_titan.model.hf import hf_config, to_hf
from gptoss_titan.model.moe import resolve_expert_kernel
from gptoss_titan.runtime.distributed import keep_freed_cpu_memory
from gptoss_titan.train.metrics import measure_matmul_tflops


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="bench", choices=sorted(FLAVORS))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--num_experts", type=int, default=0)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--no_trainer", action="store_true")
    p.add_argument("--keep_freed", action="store_true", help="malloc keeps freed memory (both models)")
    p.add_argument("--only", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    return p.parse_args()


def model_args(a: argparse.Namespace) -> ModelArgs:
    args = FLAVORS[a.flavor]
    return dataclasses.replace(args, num_experts=a.num_experts) if a.num_experts else args


def build(a: argparse.Namespace, args: ModelArgs):
    """(ours fp32, ours in the step's weight dtype or None, transformers' model)."""
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    ours = Transformer(args)
    ours.init_weights(seed=0)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    kernel, _ = resolve_expert_kernel("auto", "cpu", dt, args.num_experts, a.batch * a.seq * args.top_k)
    ours.set_expert_kernel(kernel)  # as the trainer chooses
    cfg = transformers.GptOssConfig(**hf_config(args, "bfloat16" if a.dtype == "bf16" else "float32"))
    theirs = transformers.GptOssForCausalLM._from_config(cfg, attn_implementation="eager", dtype=dt)
    theirs.load_state_dict(to_hf(ours.state_dict(), args))
    ours_w = None
    if a.dtype == "bf16":
        ours_w = Transformer(args)
        ours_w.load_state_dict(ours.state_dict())
        ours_w.to(torch.bfloat16)
        ours_w.set_expert_kernel(kernel)
    return ours, ours_w, theirs


def make_steps(a: argparse.Namespace, args: ModelArgs, ours, ours_w, theirs):
    """name -> a function(tokens) running one optimizer step, returning the loss."""

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    opts = {name: adamw(m) for name, m in (("ours", ours), ("theirs", theirs)) if m is not None}
    autocast = a.dtype == "bf16"

    def ours_step(tokens: torch.Tensor, model=ours, opt=None, ac=autocast) -> float:
        opt = opt or opts["ours"]
        x, y = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            ce_sum, _, _ = model(x, y)
        loss = ce_sum / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    def theirs_step(tokens: torch.Tensor) -> float:
        x, y = tokens[:, :-1], tokens[:, 1:].contiguous()
        out = theirs(input_ids=x, labels=y, shift_labels=y)  # the same T targets per row as ours
        out.loss.backward()
        opts["theirs"].step()
        opts["theirs"].zero_grad(set_to_none=True)
        return float(out.loss)

    steps = {
        name: fn
        for name, fn, m in (("ours", ours_step, ours), ("theirs", theirs_step, theirs))
        if m is not None
    }
    if ours_w is not None:
        opt_w = adamw(ours_w)
        steps["ours_bf16_weights"] = lambda t: ours_step(t, ours_w, opt_w, False)
    return steps


def trainer_step(a: argparse.Namespace, tmp: Path):
    """Our trainer's real step on a synthetic token file of the same shapes."""
    import numpy as np

    from gptoss_titan.config import parse_args
    from gptoss_titan.train import Trainer

    args = model_args(a)
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, args.vocab_size, 200_000, dtype=np.uint32).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"tokenizer": "synthetic", "vocab_size": args.vocab_size}))
    argv = [
        f"--model.flavor={a.flavor}",
        f"--data.dataset_path={data}",
        f"--job.dump_folder={tmp / 'run'}",
        f"--training.seq_len={a.seq}",
        f"--training.local_batch_size={a.batch}",
        "--validation.enable=false",
        "--metrics.enable_tensorboard=false",
        "--training.steps=1000",
        f"--training.cpu_keep_freed_memory={str(a.keep_freed).lower()}",
        f"--training.mixed_precision_param={'bfloat16' if a.dtype == 'bf16' else 'float32'}",
    ]
    logging.getLogger("gptoss_titan").setLevel(logging.WARNING)
    tr = Trainer(parse_args(argv))
    if a.num_experts:
        raise SystemExit("--num_experts with the trainer: add --no_trainer")
    tr.model.train()
    return lambda _tokens: float(tr.train_step().loss)


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(a: argparse.Namespace) -> None:
    """One model alone in this process (Linux): the peak RSS of its steps, reset after the build."""
    args = model_args(a)
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1))
    ours, _, theirs = build(a, args)
    if a.only == "ours":  # as the trainer runs it (fp32 weights, autocast under bf16)
        del theirs
        fn = make_steps(a, args, ours, None, None)["ours"]
    else:
        del ours
        fn = make_steps(a, args, None, None, theirs)["theirs"]
    fn(tokens)  # optimizer state exists after the first step
    base = _status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(2):
        fn(tokens)
    print(json.dumps({"peak_rss_gib": _status_gib("VmHWM"), "before_steps_gib": base}))


def main() -> None:
    a = parse()
    kept = a.keep_freed and keep_freed_cpu_memory()
    if a.only:
        memory_child(a)
        return
    args = model_args(a)
    torch.manual_seed(0)
    tokens = [torch.randint(0, args.vocab_size, (a.batch, a.seq + 1)) for _ in range(a.steps)]
    ours, ours_w, theirs = build(a, args)
    steps = make_steps(a, args, ours, ours_w, theirs)
    tmp = tempfile.TemporaryDirectory()
    if not a.no_trainer:
        steps["ours_trainer"] = trainer_step(a, Path(tmp.name))
    # The CPU's practical peak: the best n^3 matmul rate in fp32 or (under --dtype bf16) bf16; on
    # CPUs without native bf16 the bf16 rate is far below fp32, and our bf16 step runs its loss in fp32.
    cpu = torch.device("cpu")
    peaks = {"fp32": measure_matmul_tflops(cpu, torch.float32)}
    if a.dtype == "bf16":
        peaks["bf16"] = measure_matmul_tflops(cpu, torch.bfloat16)
    peak = max(peaks.values())
    first = {
        name: fn(tokens[0]) for name, fn in steps.items()
    }  # warm-up 1 (and a sanity check of the losses)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(1, a.steps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn(tokens[i])
            times[name].append(time.perf_counter() - t)
    flops = args.flops_per_token(a.seq)
    ntok = a.batch * a.seq
    print(
        f"{a.flavor} flavor ({args.num_experts} experts, top {args.top_k}), batch {a.batch} x {a.seq}, "
        f"{a.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, malloc keeps freed memory: {kept}; "
        "matmul peak " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in peaks.items()) + " GFLOP/s (measured)"
    )
    print("first-step loss: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
    print(f"{'':20s}{'step ms':>10s}{'tokens/s':>10s}{'GFLOP/s':>10s}{'% peak':>8s}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts[1:] if len(ts) > 2 else ts)
        tps = ntok / med[name]
        print(
            f"{name:20s}{med[name] * 1e3:10.1f}{tps:10.0f}{flops * tps / 1e9:10.1f}"
            f"{100 * flops * tps / (peak * 1e12):8.1f}"
        )
    for name in med:
        if name != "theirs":
            print(f"ratio {name} / transformers: {med['theirs'] / med[name]:.2f}x")
    if a.memory:
        base = [
            sys.executable,
            __file__,
            f"--flavor={a.flavor}",
            f"--dtype={a.dtype}",
            f"--batch={a.batch}",
            f"--seq={a.seq}",
            f"--num_experts={a.num_experts}",
        ] + (["--keep_freed"] if a.keep_freed else [])
        for who in ("ours", "theirs"):
            r = subprocess.run(base + [f"--only={who}"], capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(
                f"memory {who:7s} peak RSS during steps {m['peak_rss_gib']:.3f} GiB; model + optimizer "
                f"{m['before_steps_gib']:.3f} GiB; the steps add {m['peak_rss_gib'] - m['before_steps_gib']:.3f} GiB"
            )


if __name__ == "__main__":
    main()

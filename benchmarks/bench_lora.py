#!/usr/bin/env python3
"""LoRA step: ours vs transformers + peft with the same targets, rank and shape, in one process; and
our LoRA step vs our full-parameter step.

  python benchmarks/bench_lora.py [--flavor bench] [--rank 16] [--batch 4] [--seq 512] [--steps 8] [--memory]

Every variant gets the same base weights (through our Hugging Face mapping) and the same batches;
a step is forward + backward + AdamW (fused) over what trains. The LoRA variants put rank-r
adapters on attention (q, k, v, o) and on every expert (gate_up and down, one pair per expert:
peft's target_parameters), alpha = 2r, fp32. The variants alternate step by step, so a slow
phase of a shared machine hits all of them; medians after a warm-up step are compared.
--memory: each variant alone in a fresh process (Linux), the peak RSS of two steps after a first;
also net of the process's resident size before the model is built (interpreter and the
variant's libraries: torch and ours, or transformers and peft too).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptoss_titan.model import FLAVORS, Transformer
from gptoss_titan.model.hf import hf_config, to_hf
from gptoss_titan.model.lora import LoRASpec, add_lora
from gptoss_titan.model.moe import resolve_expert_kernel

VARIANTS = ("ours_lora", "peft_lora", "ours_full")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="bench", choices=sorted(FLAVORS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args()


def build(a: argparse.Namespace, variant: str):
    """(model, step function(tokens) -> loss) of one variant."""
    args = FLAVORS[a.flavor]
    base = Transformer(args)
    base.init_weights(seed=0)
    if variant == "peft_lora":
        import peft
        import transformers

        logging.getLogger("transformers").setLevel(logging.ERROR)
        cfg = transformers.GptOssConfig(**hf_config(args, "float32"))
        hf = transformers.GptOssForCausalLM._from_config(
            cfg, attn_implementation="eager", dtype=torch.float32
        )
        hf.load_state_dict(to_hf(base.state_dict(), args))
        lora = peft.LoraConfig(
            r=a.rank,
            lora_alpha=2 * a.rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        model = peft.get_peft_model(hf, lora)

        def forward(x, y):
            return model(input_ids=x, labels=y, shift_labels=y).loss

    else:
        if variant == "ours_lora":
            with torch.device("meta"):
                model = Transformer(args)
            add_lora(model, LoRASpec(a.rank, 2.0 * a.rank, 0.0, ("attention", "experts")))
            model.to_empty(device="cpu")
            model.init_weights(seed=1)
            model.load_state_dict(base.state_dict(), strict=False)
        else:
            model = base
        kernel, _ = resolve_expert_kernel(
            "auto", "cpu", torch.float32, args.num_experts, a.batch * a.seq * args.top_k
        )
        model.set_expert_kernel(kernel)

        def forward(x, y):
            ce_sum, _, _ = model(x, y)
            return ce_sum / y.numel()

    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, fused=True)

    def step(tokens: torch.Tensor) -> float:
        x, y = tokens[:, :-1], tokens[:, 1:].contiguous()
        loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return model, step, sum(p.numel() for p in trained)


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(field)


def memory_child(a: argparse.Namespace) -> None:
    if a.only == "peft_lora":  # its libraries are loaded before the baseline, as ours are
        import peft  # noqa: F401
        import transformers  # noqa: F401
    start = _status_gib("VmRSS")  # interpreter and libraries, no model yet
    tokens = torch.randint(
        0, FLAVORS[a.flavor].vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    _, step, _ = build(a, a.only)
    step(tokens)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) from here
    for _ in range(2):
        step(tokens)
    peak = _status_gib("VmHWM")
    print(json.dumps({"peak_rss_gib": peak, "net_gib": peak - start}))


def main() -> None:
    a = parse()
    if a.only:
        memory_child(a)
        return
    torch.manual_seed(0)
    vocab = FLAVORS[a.flavor].vocab_size
    tokens = [torch.randint(0, vocab, (a.batch, a.seq + 1)) for _ in range(a.steps)]
    built = {v: build(a, v) for v in VARIANTS}
    first = {v: built[v][1](tokens[0]) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(1, a.steps):
        for v in VARIANTS:
            t = time.perf_counter()
            built[v][1](tokens[i])
            times[v].append(time.perf_counter() - t)
    n = a.batch * a.seq
    out = {}
    for v in VARIANTS:
        med = statistics.median(times[v])
        out[v] = {
            "tokens_per_s": n / med,
            "step_ms": 1000 * med,
            "first_loss": first[v],
            "trained": built[v][2],
        }
    if a.memory:
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--only", v, *sys.argv[1:]]
            cmd = [c for c in cmd if c != "--memory"]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[v].update(json.loads(r.stdout.strip().splitlines()[-1]))
    for v, row in out.items():
        print(f"{v:<10} " + "  ".join(f"{k} {x:,.4g}" for k, x in row.items()))
    o, p, f = out["ours_lora"], out["peft_lora"], out["ours_full"]
    print(f"ours vs peft LoRA: {o['tokens_per_s'] / p['tokens_per_s']:.2f}x tokens/s", end="")
    if a.memory:
        print(f", {o['peak_rss_gib'] / p['peak_rss_gib']:.2f}x peak memory", end="")
        print(f" ({o['net_gib'] / p['net_gib']:.2f}x above each process's libraries)", end="")
    print(f"; ours LoRA vs ours full: {o['tokens_per_s'] / f['tokens_per_s']:.2f}x tokens/s", end="")
    if a.memory:
        print(f", {o['peak_rss_gib'] / f['peak_rss_gib']:.2f}x peak memory", end="")
    print()


if __name__ == "__main__":
    main()

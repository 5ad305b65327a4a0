#!/usr/bin/env python3
"""Decode speed: our KV-cached sampler vs transformers' generate on the same weights, same process.

  python benchmarks/bench_generate.py [--flavor bench] [--prompt_len 64] [--new 128] [--repeats 3]

Both models get identical weights (through our Hugging Face mapping), fp32, greedy decoding of the
same prompt; their outputs are checked equal, then decode tokens/s is timed alternately and the
median ratio ours / theirs is printed. Timings on shared machines swing: compare ratios only.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from gptoss_titan.infer.generate import generate
from gptoss_titan.model import FLAVORS, Transformer
from gptoss_titan.model.hf import hf_config, to_hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="bench")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = FLAVORS[a.flavor]
    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights(seed=0)
    ours.eval()
    cfg = transformers.GptOssConfig(**hf_config(args, "float32"))
    theirs = transformers.GptOssForCausalLM._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    ).eval()
    theirs.load_state_dict(to_hf(ours.state_dict(), args))
    prompt = torch.randint(0, min(args.vocab_size, 199990), (1, a.prompt_len))

    def run_ours() -> torch.Tensor:
        return generate(ours, prompt, a.new)

    def run_ours_compiled() -> torch.Tensor:
        return generate(ours, prompt, a.new, compile=True)

    def run_theirs() -> torch.Tensor:
        with torch.no_grad():
            return theirs.generate(
                prompt,
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    ref = run_theirs()
    same = torch.equal(run_ours(), ref)
    t0 = time.perf_counter()
    same_compiled = torch.equal(run_ours_compiled(), ref)  # includes the one-time compile
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"ours": [], "ours compiled": [], "transformers": []}
    fns = {"ours": run_ours, "ours compiled": run_ours_compiled, "transformers": run_theirs}
    for _ in range(a.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{a.flavor}: prompt {a.prompt_len}, {a.new} new tokens, fp32, {torch.get_num_threads()} threads; "
        f"outputs equal to transformers: eager {same}, compiled {same_compiled}"
    )
    for name, t in med.items():
        print(f"{name:14s} {a.new / t:8.1f} tokens/s (prefill + decode)")
    print(
        f"ratio ours / transformers: {med['transformers'] / med['ours']:.2f}x; "
        f"compiled: {med['transformers'] / med['ours compiled']:.2f}x "
        f"(after a one-time compile + first run of {compile_s:.0f} s)"
    )


if __name__ == "__main__":
    main()

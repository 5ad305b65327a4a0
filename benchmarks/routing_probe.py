#!/usr/bin/env python3
"""Why routing collapses early: the router's inputs and logits over the first steps of a run.

  python benchmarks/routing_probe.py [--steps 12] [--section.field=value ...]

Runs the debug config (one process, no validation, no checkpoints) and after the given steps
prints per layer, for the last batch's tokens: the range over experts of the mean logit (the
common mode, shared by every token), how much of it is the router's learned bias, the mean over
experts of the logits' spread across tokens (what a per-expert bias can split tokens by), the
mean cosine between each token's router input and their mean, and the range of the balancing
bias. Extra arguments go to the trainer's config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dump", default="/tmp/routing_probe")
    a, extra = p.parse_known_args()
    from gptoss_titan.config import parse_args
    from gptoss_titan.runtime.distributed import apply_process_settings
    from gptoss_titan.train import Trainer

    cfg = parse_args(
        ["--config", str(ROOT / "train_configs" / "debug_model.toml"), f"--job.dump_folder={a.dump}",
         "--metrics.sample_freq=0", "--validation.enable=false", "--checkpoint.enable=false",
         "--metrics.log_freq=1000", *extra]
    )  # fmt: skip
    apply_process_settings(cfg)
    tr = Trainer(cfg)
    stats: dict[int, str] = {}

    def hook(layer: int):
        def record(mod, inp, out):
            x, logits = inp[0].detach().float(), out.detach().float()
            common = logits.mean(0)
            mean_x = x.mean(0)
            cos = (x @ mean_x / (x.norm(dim=1) * mean_x.norm() + 1e-12)).mean()
            b = mod.bias.detach().float()
            stats[layer] = (
                f"common mode {(common.max() - common.min()).item():.3f} (learned bias "
                f"{(b.max() - b.min()).item():.3f}), token spread {logits.std(0).mean().item():.3f}, "
                f"cos(x, mean x) {cos.item():.2f}"
            )

        return record

    blocks = tr.model.blocks()
    for blk in blocks:
        blk.moe.router.gate.register_forward_hook(hook(blk.layer_id))
    for step in range(1, a.steps + 1):
        tr.train_step()
        print(f"step {step} lr {tr.optimizer.param_groups[0]['lr']:.1e}")
        for blk in blocks:
            eb = blk.moe.router.expert_bias
            rng = f", balancing bias {(eb.max() - eb.min()).item():.3f}" if eb is not None else ""
            print(f"  layer {blk.layer_id}: {stats[blk.layer_id]}{rng}")


if __name__ == "__main__":
    main()

"""Run the trainer under torchrun and save (rank 0) the per-step losses and the full final weights.

  torchrun --standalone --nproc_per_node=N tests/parallel/run_job.py OUT.pt [--init-only] --section.field=value ...

--init-only saves the freshly initialized weights without training. --trace-p2p records every
point-to-point op and checks across the ranks that each send has its receive (p2p_trace.py).
"""

import json
import sys

import torch
from p2p_trace import P2PTrace  # this folder is on the job's path
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from gptoss_titan.config import parse_args
from gptoss_titan.runtime.cli import exit_now
from gptoss_titan.runtime.distributed import apply_process_settings, shutdown
from gptoss_titan.train import Trainer


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    init_only, trace_p2p = "--init-only" in argv, "--trace-p2p" in argv
    argv = [a for a in argv if a not in ("--init-only", "--trace-p2p")]
    trace = P2PTrace() if trace_p2p else None
    cfg = parse_args(argv)
    apply_process_settings(cfg)
    tr = Trainer(cfg)
    if not init_only:
        tr.train()
    sends = trace.check() if trace is not None else None  # (every rank takes part)
    # the checkpoint's own process group exists only when a run saves or loads checkpoints
    assert tr.checkpoint._pg is None or cfg.checkpoint.enable or cfg.checkpoint.initial_load_path
    if tr.meshes is not None:
        # cpu_offload keeps the full tensors on global rank 0 only: not for other pipeline stages
        offload = tr.pipeline is None
        state = get_model_state_dict(
            tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload)
        )
        state = {k: v.detach().cpu() for k, v in state.items()}
    else:
        state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
    if tr.pipeline is not None:  # each pipeline stage holds its own parameters: gather them on rank 0
        parts = [None] * tr.world_size if tr.rank == 0 else None
        torch.distributed.gather_object(state, parts, dst=0)
        state = {k: v for part in parts or [] for k, v in part.items()}
    if tr.rank == 0:
        metrics = tr.dump / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        torch.save(
            {
                "losses": [r["loss"] for r in rows if "loss" in r],
                "grad_norms": [r["grad_norm"] for r in rows if "grad_norm" in r],
                "balanced_layers": [r.get("balanced_routing_layers") for r in rows if "loss" in r],
                "state": state,
                "p2p_sends": sends,
                # TORCH_DISTRIBUTED_DEBUG=DETAIL: every collective's fingerprint compared across ranks
                "debug_level": torch.distributed.get_debug_level().name,
            },
            out,
        )
    shutdown()


if __name__ == "__main__":
    main()
    exit_now(0)  # no interpreter teardown (runtime/cli.py)

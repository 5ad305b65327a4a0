"""Count the collectives one training step dispatches (forward and backward) under torchrun; rank 0
writes the count as JSON.

  torchrun --nproc_per_node=2 tests/parallel/sac_collectives_job.py OUT.json --section.field=value ...
"""

import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptoss_titan.config import parse_args
from gptoss_titan.runtime.cli import exit_now
from gptoss_titan.runtime.distributed import apply_process_settings, shutdown
from gptoss_titan.train import Trainer

COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("_c10d_functional") and func.overloadpacket.__name__ in COLLECTIVES:
            self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    cfg = parse_args(argv)
    apply_process_settings(cfg)
    tr = Trainer(cfg)
    tr.train_step()  # warm-up (AdamW state)
    batches = [tr.train_loader.next_batch() for _ in range(tr.accum_steps)]
    with Count() as c:
        tr.train_module(batches, tr.step)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(c.n, f)
    shutdown()


if __name__ == "__main__":
    main()
    exit_now(0)  # no interpreter teardown (runtime/cli.py)

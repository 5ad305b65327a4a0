"""Per-rank peak memory of loading a Hugging Face folder for sampling (run under torchrun).

torchrun --nproc_per_node=2 tests/sample_load_rss.py HF_FOLDER OUT.json
"""

import argparse
import json
import sys

from gptoss_titan.infer.sample import load_model
from gptoss_titan.runtime.distributed import init_distributed, shutdown


def hwm_mib() -> int:
    """The process's peak resident size so far (VmHWM), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    rank, _ = init_distributed()
    before = hwm_mib()
    load_model(
        argparse.Namespace(
            hf=folder, checkpoint=None, config=None, dtype="float32", num_samples=1, adapter=None
        )
    )
    grown = hwm_mib() - before
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"grown_mib": grown}, f)
    shutdown()


if __name__ == "__main__":
    main()

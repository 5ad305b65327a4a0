"""The trainer with a slowed-down checkpoint writer, for crash tests (a test hook, injected here:
the package never reads it).

  python tests/checkpoint/slow_save_train.py DELAY_S --section.field=value ...
"""

import sys
import time

from torch.distributed.checkpoint import FileSystemWriter

from gptoss_titan.config import parse_args
from gptoss_titan.distributed import apply_process_settings, shutdown
from gptoss_titan.train import Trainer


def main() -> None:
    delay, argv = float(sys.argv[1]), sys.argv[2:]

    class SlowWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            time.sleep(delay)
            return super().write_data(plan, planner)

    cfg = parse_args(argv)
    apply_process_settings(cfg)
    Trainer(cfg, checkpoint_writer=SlowWriter).train()
    shutdown()


if __name__ == "__main__":
    main()

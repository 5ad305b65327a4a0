"""The trainer with injected faults, through the real entry point (train.main):

  python tests/reliability/chaos_train.py [--slow-save S] [--slow-val S] [--nan-at K[,K...]] [--nan-from K]
                                          [--skip-at K] --section.field=value ...

--slow-save S   the checkpoint writer sleeps S seconds before writing (a long save to kill)
--slow-val S    validation announces itself ("validating") and sleeps S seconds
--nan-at K      rank 0 poisons one gradient with NaN at step K (the guard must skip it on every rank)
--nan-from K    ... at every step from K on (the guard must stop the run)
--skip-at K     the reference for --nan-at: step K consumes its batches and updates nothing
The package never reads any of this: the hooks are a subclass injected here.
"""

import sys
import time

import torch

from gptoss_titan.checkpoint.integrity import IntegrityWriter
from gptoss_titan.train import Trainer, main
from gptoss_titan.train.step import TrainStep

FAULTS = ("--slow-save", "--slow-val", "--nan-at", "--nan-from", "--skip-at")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """The fault options (each with a value) and the trainer's arguments (everything else)."""
    faults, rest, i = {}, [], 0
    while i < len(argv):
        if argv[i] in FAULTS:
            faults[argv[i].lstrip("-").replace("-", "_")] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return faults, rest


def chaos_trainer(faults: dict) -> type[Trainer]:
    nan_steps = {int(k) for k in faults.get("nan_at", "").split(",") if k}
    nan_from = int(faults.get("nan_from", 0)) or None
    skip_at = int(faults.get("skip_at", 0)) or None
    slow_save, slow_val = float(faults.get("slow_save", 0)), float(faults.get("slow_val", 0))

    class SlowWriter(IntegrityWriter):
        def write_data(self, plan, planner):
            time.sleep(slow_save)
            return super().write_data(plan, planner)

    class ChaosStep(TrainStep):
        def clip_gradients(self, step):
            poison = step in nan_steps or (nan_from is not None and step >= nan_from)
            if poison and self.rank == 0:
                p = next(p for p in self.model.parameters() if p.grad is not None)
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.view(-1)[0] = float("nan")
            return super().clip_gradients(step)

    class Chaos(Trainer):
        step_class = ChaosStep

        def __init__(self, cfg):
            super().__init__(cfg, checkpoint_writer=SlowWriter if slow_save else None)

        def train_step(self):
            if self.step == skip_at:  # consume the batches, update nothing
                for _ in range(self.accum_steps):
                    self.train_loader.next_batch()
                return self._skipped_result()
            return super().train_step()

        def _skipped_result(self):
            from gptoss_titan.train.metrics import StepResult

            zero = torch.zeros((), device=self.device)
            counts = torch.zeros(self.model_args.n_layers, self.model_args.num_experts, dtype=torch.long)
            return StepResult(zero, 0.0, zero, counts, None, 0.0, zero)

        def validate(self):
            if slow_val:
                print("validating", flush=True)
                time.sleep(slow_val)
            return super().validate()

    return Chaos


if __name__ == "__main__":
    faults, argv = parse(sys.argv[1:])
    sys.exit(main(argv, chaos_trainer(faults)))

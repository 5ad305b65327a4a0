"""Training: the Trainer (the loop, metrics, when to evaluate and save), the TrainStep (one
optimizer step), the TrainState (what a checkpoint holds). `python -m gptoss_titan.train`."""

from .trainer import Trainer, main

__all__ = ["Trainer", "main"]

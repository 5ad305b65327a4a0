"""Training: the Trainer (the loop, metrics, when to evaluate and save), the TrainStep (one
optimizer step), the TrainState (what a checkpoint holds). `python -m gptoss_titan.train`."""

from .entry import main
from .trainer import Trainer

__all__ = ["Trainer", "main"]

"""Everything a run needs to resume exactly, as Stateful objects gathered in one TrainState.

Each member has `state_dict()` / `load_state_dict()`; the CheckpointManager saves and loads them
under fixed keys, knowing nothing about what they hold. Model and optimizer go through
torch.distributed.checkpoint's state-dict helpers, so the same files load at any sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..data import TokenLoader
from .guard import StepGuard


@dataclass
class Progress:
    """Optimizer steps taken and tokens trained on."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class ModelState:
    """The model's parameters and persistent buffers (plain or sharded), by parameter name."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self, dtype: torch.dtype | None = None) -> dict:
        sd = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=False))
        return sd if dtype is None else {k: v.to(dtype) for k, v in sd.items()}

    def load_state_dict(self, state: dict) -> None:
        # strict=False: the loader may leave out the balancing biases a checkpoint lacks; every
        # other name was loaded by DCP, which fails on a missing one
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))


class OptimizerState:
    """AdamW's moments and step counts, keyed by parameter name (so any sharding loads them)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class LRSchedulerState:
    """The schedule's position. Loaded after the optimizer: the learning rate then follows the
    current config (e.g. a run extended to more training.steps), not the lr saved in the groups."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        s = self.scheduler
        s.load_state_dict(state)
        for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["lr"] = base * fn(s.last_epoch)


class RNGState:
    """This rank's CPU (and CUDA) generator states."""

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """The Stateful parts of a run. `members()` is the checkpoint's layout: key -> object, in the
    order they load (the optimizer before the LR schedule, which rewrites its groups' lr)."""

    progress: Progress
    model: ModelState
    optimizer: OptimizerState
    lr_scheduler: LRSchedulerState
    dataloader: TokenLoader
    rng: RNGState
    guard: StepGuard | None = None

    # Members a checkpoint may lack (saved before they existed): loading leaves them as they are.
    OPTIONAL = ("step_guard",)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        dataloader: TokenLoader,
        guard: StepGuard | None = None,
    ) -> TrainState:
        return cls(
            Progress(),
            ModelState(model),
            OptimizerState(model, optimizer),
            LRSchedulerState(lr_scheduler),
            dataloader,
            RNGState(),
            guard,
        )

    def members(self, rank: int) -> dict[str, object]:
        """Checkpoint key -> Stateful. RNG states (and a streaming loader's position) are per rank
        (`rng_rank<r>`, `dataloader_dp<data-parallel rank>`); the rest is global."""
        out = {
            "model": self.model,
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            getattr(self.dataloader, "state_key", "dataloader"): self.dataloader,
            "train_state": self.progress,
            f"rng_rank{rank}": self.rng,
        }
        if self.guard is not None:
            out["step_guard"] = self.guard
        return out

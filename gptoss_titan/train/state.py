"""Everything a run needs to resume exactly, as Stateful objects gathered in one TrainState.

Each member has `state_dict()` / `load_state_dict()`. TrainState owns the checkpoint's layout: its
keys (config.SAVED_STATES), which a checkpoint may lack, the per-rank ones (RNG, a stream's
position) and what to do when a checkpoint was saved by fewer ranks. The CheckpointManager only
saves and loads the state dicts it is handed. Model and optimizer go through
torch.distributed.checkpoint's state-dict helpers, so the same files load at any sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint.files import CheckpointError, checkpoint_fqns
from ..checkpoint.manager import CheckpointManager
from ..config import SAVED_STATES
from ..data import TokenLoader
from ..model.hf import is_native_only
from ..model.lora import is_adapter
from ..runtime.errors import UserError
from ..runtime.log import Timer, logger
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
    """The model's parameters and persistent buffers (plain or sharded), by parameter name; with
    adapters_only, the LoRA adapters alone (the frozen base is loaded from its own checkpoint)."""

    def __init__(self, model: nn.Module, adapters_only: bool = False):
        self.model, self.adapters_only = model, adapters_only

    def state_dict(self, dtype: torch.dtype | None = None) -> dict:
        sd = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=False))
        if self.adapters_only:
            sd = {k: v for k, v in sd.items() if is_adapter(k)}
        return sd if dtype is None else {k: v.to(dtype) for k, v in sd.items()}

    def load_state_dict(self, state: dict) -> None:
        # strict=False: the loader may leave out the balancing biases a checkpoint lacks; every
        # other name was loaded by DCP, which fails on a missing one
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))


class OptimizerState:
    """AdamW's moments and step counts, keyed by parameter name (so any sharding loads them)."""

    SETTINGS = ("weight_decay", "betas", "eps")  # the config's, not the checkpoint's, after a load

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.config = [{k: g[k] for k in self.SETTINGS} for g in optimizer.param_groups]

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
        for group, settings in zip(self.optimizer.param_groups, self.config):
            group.update(settings)  # a resume may change them (train/contract.py)


class LRSchedulerState:
    """The schedule's position. Loaded after the optimizer: the learning rate then follows the
    current config - its optimizer.lr and schedule (e.g. a run extended to more training.steps) at
    the resumed step - not the lr saved in the groups."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler
        self.base_lrs = list(scheduler.base_lrs)  # the config's peak lr per group

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        s = self.scheduler
        s.load_state_dict(state)
        s.base_lrs = list(self.base_lrs)
        for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["initial_lr"] = base
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
        adapters_only: bool = False,
    ) -> TrainState:
        return cls(
            Progress(),
            ModelState(model, adapters_only),
            OptimizerState(model, optimizer),
            LRSchedulerState(lr_scheduler),
            dataloader,
            RNGState(),
            guard,
        )

    def members(self, rank: int) -> dict[str, object]:
        """Checkpoint key -> Stateful, in SAVED_STATES' order. RNG states (and a streaming loader's
        position) are per rank (`rng_rank<r>`, `dataloader_dp<data-parallel rank>`); the rest is global."""
        by_name = {
            "model": self.model,
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "dataloader": self.dataloader,
            "train_state": self.progress,
            "step_guard": self.guard,
            "rng": self.rng,
        }
        keys = {"dataloader": getattr(self.dataloader, "state_key", "dataloader"), "rng": f"rng_rank{rank}"}
        return {keys.get(n, n): by_name[n] for n in SAVED_STATES if by_name[n] is not None}

    def state_dicts(self, rank: int, model_only: bool = False, dtype: torch.dtype | None = None) -> dict:
        """What a save writes: every member's state dict, or the model's alone (in `dtype`)."""
        if model_only:
            return {"model": self.model.state_dict(dtype)}
        return {k: m.state_dict() for k, m in self.members(rank).items()}

    def load(
        self, checkpoint: CheckpointManager, path: Path, exclude: list[str], model_only: bool
    ) -> set[str]:
        """Load the members `path` holds (the model alone if model_only; none of `exclude`, names of
        SAVED_STATES); the keys loaded. A checkpoint saved by fewer ranks gives new ranks rank 0's
        generator state; a member it lacks is a one-line CheckpointError unless optional or excluded."""
        keys = checkpoint.saved_keys(path)
        rank = checkpoint.rank
        members = self.members(rank)
        excluded = set(exclude) | ({k for k in SAVED_STATES if k != "model"} if model_only else set())
        rng = members.pop(f"rng_rank{rank}")
        members = {k: m for k, m in members.items() if k.partition("_dp")[0] not in excluded}
        if "rng" not in excluded:
            # Resharded to more ranks than saved: new ranks take rank 0's generator state.
            saved_rng = next((k for k in (f"rng_rank{rank}", "rng_rank0") if k in keys), None)
            if saved_rng is not None:
                members[saved_rng] = rng
        members = {k: m for k, m in members.items() if k in keys or k not in self.OPTIONAL}
        missing = [k for k in members if k not in keys]
        # decided together: one rank alone would leave the others waiting in the load
        if checkpoint.any_rank(any(k.startswith("dataloader_dp") for k in missing)):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no stream position for every data-parallel rank of this run "
                "(saved by another layout or without data.stream); resume a streaming run with the same layout, "
                "or add dataloader to checkpoint.exclude_from_loading to restart the stream"
            )
        if missing:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no {missing[0]!r} state; "
                "add it to checkpoint.exclude_from_loading or use a full checkpoint"
            )
        state = {k: m.state_dict() for k, m in members.items()}
        if "model" in state:
            drop_absent(state["model"], path)
        fqns = checkpoint_fqns(path)
        for k in [k for k in state if k.startswith("rng_rank")]:  # saved on a CPU: no CUDA generator state
            state[k] = {name: v for name, v in state[k].items() if f"{k}.{name}" in fqns}
        seconds = checkpoint.load(path, state)
        for k, m in members.items():
            m.load_state_dict(state[k])
        what = "model" if model_only else ", ".join(k if not k.startswith("rng") else "rng" for k in members)
        logger.info(f"loaded {what} from {path} in {seconds:.2f}s")
        return set(members)

    def load_base(self, checkpoint: CheckpointManager, path: Path) -> None:
        """A LoRA run's frozen base: every parameter but the adapters, from a model checkpoint."""
        full = ModelState(self.model.model)
        state = {"model": {k: v for k, v in full.state_dict().items() if not is_adapter(k)}}
        drop_absent(state["model"], path)
        seconds = checkpoint.load(path, state)
        full.load_state_dict(state["model"])
        logger.info(f"loaded the frozen base from {path} in {seconds:.2f}s")

    def load_base_hf(self, checkpoint: CheckpointManager, path: Path, args) -> None:
        """A LoRA run's frozen base from a Hugging Face folder, each rank reading the parts it
        holds (MXFP4 experts as stored when the base is MXFP4-resident); one line on every rank
        if any rank cannot read it."""
        from ..interop.convert import HFFolder, load_hf_into

        timer, error = Timer(), None
        try:
            load_hf_into(self.model.model, HFFolder(str(path)), args)
        except Exception as e:  # every rank learns of it, or the others would wait in the first collective
            error = e
        if checkpoint.any_rank(error is not None):
            if isinstance(error, UserError):
                raise CheckpointError(f"checkpoint.initial_load_path: {error}") from None
            if error is not None:
                raise error
            raise CheckpointError(
                f"checkpoint.initial_load_path: another rank could not read the base {str(path)!r}"
            )
        logger.info(f"loaded the frozen base from {path} in {timer.lap():.2f}s")

    def load_adapters(self, adapters: dict[str, torch.Tensor]) -> None:
        """Whole adapter tensors (every rank holds them: they are small) into the sharded model."""
        set_model_state_dict(
            self.model.model, adapters, options=StateDictOptions(full_state_dict=True, strict=False)
        )


def drop_absent(model_state: dict, path: Path) -> None:
    """Leave out what a checkpoint may lack: the balancing biases are ours alone (an HF import or a
    run without balancing has none: they start at zero); a base has no adapters (they start fresh)."""
    saved = checkpoint_fqns(path)
    absent = [k for k in model_state if f"model.{k}" not in saved and (is_native_only(k) or is_adapter(k))]
    for k in absent:
        del model_state[k]
    biases = sum(is_native_only(k) for k in absent)
    if biases:
        logger.info(f"{biases} expert-bias buffers are not in {path}: they start at zero")
    if len(absent) > biases:
        logger.info(f"{len(absent) - biases} LoRA adapters are not in {path}: they start fresh")

"""CheckpointManager: DCP checkpoints that resume exactly, reshard, and are never half-written.

Layout: `<dump_folder>/<folder>/step-<N>/` holds the DCP files (`.metadata` + shards) of
  model, optimizer, lr_scheduler, dataloader, train_state (step, tokens seen),
  rng/rank<r> (CPU and CUDA generator states of every rank),
plus `config.json` and `model_args.json`. A save is written to `step-<N>.tmp/` and renamed to
`step-<N>/` by rank 0 only once DCP finished writing `.metadata` after every rank's shards: a
crash mid-save leaves a `.tmp` folder that resume ignores and retention removes.

Async saves (`async_mode = "async"`) stage the state into memory, return, and write in the
background on their own gloo process group (on the default group, gloo collectives of the writer
would interleave with training's: CPU_NOTES.md). A new save waits for the previous one; the
final save is waited for before the program exits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .config import Checkpoint as CkptConfig
from .metrics import logger
from .model import ModelArgs

STEP_DIR = re.compile(r"step-(\d+)$")
SAVE_DELAY_ENV = "GPTOSS_TITAN_SAVE_DELAY_S"  # tests only: slow the background writer down


class CheckpointError(ValueError):
    """A user-caused checkpoint problem; entry points print it as one line and exit 2."""


def complete_steps(folder: Path) -> list[int]:
    """Steps with a finished checkpoint in folder (renamed from .tmp, DCP metadata present), ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def check_model_args(path: Path, args: ModelArgs) -> None:
    saved_file = path / "model_args.json"
    if not saved_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no model_args.json; it is not a gptoss-titan checkpoint")
    saved = json.loads(saved_file.read_text())
    for k, v in args.to_dict().items():
        if k in saved and saved[k] != v:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has model {k} = {saved[k]!r} but the config gives {v!r}; "
                "use the checkpoint's model.flavor or another checkpoint"
            )


def checkpoint_keys(path: Path) -> set[str]:
    """Top-level state keys in a DCP checkpoint (raises CheckpointError if it cannot be read)."""
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # truncated / corrupt metadata
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); "
                              "delete it or choose another with --checkpoint.load_step") from None
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


class _SlowWriter(FileSystemWriter):
    def __init__(self, path: str, delay: float):
        super().__init__(path)
        self.delay = delay

    def write_data(self, plan, planner):
        time.sleep(self.delay)
        return super().write_data(plan, planner)


class CheckpointManager:
    def __init__(self, cfg: CkptConfig, dump_folder: Path, model: torch.nn.Module, optimizer, lr_scheduler,
                 dataloader, train_state: Callable[[], dict], load_train_state: Callable[[dict], None],
                 model_args: ModelArgs, run_config: dict, rank: int, world_size: int):
        self.cfg, self.model, self.optimizer, self.lr_scheduler = cfg, model, optimizer, lr_scheduler
        self.dataloader, self.train_state, self.load_train_state = dataloader, train_state, load_train_state
        self.model_args, self.run_config, self.rank, self.world = model_args, run_config, rank, world_size
        self.folder = dump_folder / cfg.folder
        self.distributed = dist.is_initialized()
        if not self.distributed:  # one process: DCP's "assuming a single process" warning is expected
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self.pg = dist.new_group(backend="gloo") if self.distributed else None
        self.delay = float(os.environ.get(SAVE_DELAY_ENV, "0"))
        self._future = None
        self._finalized = threading.Event()
        self._finalized.set()
        self.last_saved = -1
        if cfg.async_mode == "async_with_pinned_mem" and not torch.cuda.is_available():
            logger.info("checkpoint.async_mode = async_with_pinned_mem needs CUDA; using plain async on CPU")

    # ----- what gets saved ----------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def _state(self, model_only: bool, export_dtype: torch.dtype | None = None) -> dict:
        opts = StateDictOptions(ignore_frozen_params=False)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        if export_dtype is not None:
            model_sd = {k: v.to(export_dtype) for k, v in model_sd.items()}
        state = {"model": model_sd}
        if not model_only:
            state.update(optimizer=optim_sd, lr_scheduler=self.lr_scheduler.state_dict(),
                         dataloader=self.dataloader.state_dict(), train_state=self.train_state())
            state[f"rng_rank{self.rank}"] = self._rng_state()
        return state

    # ----- saving ---------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the save in flight (if any) is written and renamed into place."""
        if self._future is not None:
            self._future.result()
            self._future = None
        self._finalized.wait()

    def maybe_save(self, step: int, last: bool) -> None:
        if self.cfg.enable and (step % self.cfg.interval == 0 or last) and step != self.last_saved:
            model_only = last and self.cfg.last_save_model_only
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.export_dtype] if model_only else None
            self.save(step, model_only=model_only, export_dtype=dtype, blocking=last)

    def save(self, step: int, model_only: bool = False, export_dtype: torch.dtype | None = None,
             blocking: bool = False) -> None:
        self.wait()  # one save at a time
        tmp = self.folder / f"step-{step}.tmp"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            (tmp / "config.json").write_text(json.dumps(self.run_config, indent=2) + "\n")
            (tmp / "model_args.json").write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        if self.distributed:
            dist.barrier(group=self.pg)
        state = self._state(model_only, export_dtype)
        writer = _SlowWriter(str(tmp), self.delay) if self.delay else FileSystemWriter(str(tmp))
        t0 = time.perf_counter()
        self._finalized.clear()
        if self.cfg.async_mode == "disabled":
            dcp.save(state, storage_writer=writer, process_group=self.pg, no_dist=not self.distributed)
            self._finalize(step, t0)
        else:
            stager = None
            if self.cfg.async_mode == "async_with_pinned_mem" and torch.cuda.is_available():
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                      use_async_staging=False, use_non_blocking_copy=True))
            self._future = dcp.async_save(state, storage_writer=writer, process_group=self.pg,
                                          no_dist=not self.distributed, async_stager=stager)
            if not isinstance(self._future, Future):  # newer torch returns a response with the upload future
                self._future = self._future.upload_completion
            self._future.add_done_callback(lambda f: self._finalize(step, t0, f))
            logger.info(f"checkpoint step {step}: staged in {time.perf_counter() - t0:.2f}s, writing in background")
        self.last_saved = step
        if blocking:
            self.wait()

    def _finalize(self, step: int, t0: float, future=None) -> None:
        try:
            if future is not None and future.exception() is not None:
                logger.info(f"checkpoint step {step} failed: {future.exception()!r}")
                return
            if self.rank == 0:
                final = self.folder / f"step-{step}"
                if final.exists():
                    shutil.rmtree(final)
                os.replace(self.folder / f"step-{step}.tmp", final)
                self._retain(step)
                logger.info(f"checkpoint step {step} complete in {time.perf_counter() - t0:.2f}s: {final}")
        finally:
            self._finalized.set()

    def _retain(self, newest: int) -> None:
        """Keep the newest keep_latest_k complete checkpoints; drop abandoned .tmp folders."""
        for p in self.folder.glob("step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        k = self.cfg.keep_latest_k
        if k > 0:
            older = [s for s in complete_steps(self.folder) if s != newest]
            for s in older[: max(len(older) + 1 - k, 0)]:  # the newest always stays
                shutil.rmtree(self.folder / f"step-{s}", ignore_errors=True)

    # ----- loading --------------------------------------------------------------------------
    def resume_source(self) -> tuple[Path, bool] | None:
        """(checkpoint to load, model only?) or None; raises CheckpointError for bad requests."""
        c = self.cfg
        if not c.enable and not c.initial_load_path:
            return None
        steps = complete_steps(self.folder) if c.enable else []
        if c.enable and c.load_step >= 0:
            if c.load_step not in steps:
                have = ", ".join(map(str, steps)) or "none"
                raise CheckpointError(f"checkpoint.load_step = {c.load_step} not found in {str(self.folder)!r} "
                                      f"(complete steps: {have}); use one of them or -1 for the latest")
            path = self.folder / f"step-{c.load_step}"
        elif steps:
            path = self.folder / f"step-{steps[-1]}"
        elif c.initial_load_path and c.initial_load_format == "hf":
            return self._import_hf(Path(c.initial_load_path)), True
        elif c.initial_load_path:
            path = Path(c.initial_load_path)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.initial_load_path {c.initial_load_path!r} does not exist; "
                                      "pass a step-<N> folder of a checkpoint")
            if not (path / ".metadata").is_file():
                found = complete_steps(path)
                if not found:
                    raise CheckpointError(f"checkpoint.initial_load_path {c.initial_load_path!r} holds no DCP "
                                          "checkpoint (.metadata missing); pass a step-<N> folder")
                path = path / f"step-{found[-1]}"
            check_model_args(path, self.model_args)
            checkpoint_keys(path)
            return path, c.initial_load_model_only
        else:
            return None
        check_model_args(path, self.model_args)
        keys = checkpoint_keys(path)
        return path, "optimizer" not in keys  # a seed or model-only checkpoint restores the model alone

    def _import_hf(self, hf_dir: Path) -> Path:
        """Convert a Hugging Face folder once (rank 0) into <folder>/hf-import, then load it like DCP."""
        from .convert import ConvertError, HFFolder, args_from_hf_config, hf_to_dcp

        try:
            hf_args = args_from_hf_config(HFFolder(str(hf_dir)).config)  # checks before writing anything
        except ConvertError as e:
            raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None
        mismatch = [(k, v, getattr(self.model_args, k)) for k, v in hf_args.to_dict().items()
                    if k not in ("max_seq_len", "init_std", "load_balance_bias") and getattr(self.model_args, k) != v]
        if mismatch:
            k, theirs, ours = mismatch[0]
            raise CheckpointError(f"Hugging Face folder {str(hf_dir)!r} has model {k} = {theirs!r} but the "
                                  f"config gives {ours!r}; use the matching model.flavor")
        out = self.folder / "hf-import"
        if self.rank == 0 and not (out / ".metadata").is_file():
            try:
                hf_to_dcp(str(hf_dir), str(out), overwrite=True)
            except ConvertError as e:
                raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None
            (out / "model_args.json").write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        if self.distributed:
            dist.barrier(group=self.pg)
        return out

    def load(self, source: tuple[Path, bool]) -> None:
        path, model_only = source
        keys = checkpoint_keys(path)
        state = self._state(model_only)
        for k in self.cfg.exclude_from_loading:
            state.pop(k, None)
        rng_key = None
        if f"rng_rank{self.rank}" in state:
            # Resharded to more ranks than saved: new ranks take rank 0's generator state.
            template = state.pop(f"rng_rank{self.rank}")
            rng_key = next((k for k in (f"rng_rank{self.rank}", "rng_rank0") if k in keys), None)
            if rng_key is not None:
                state[rng_key] = template
        missing = [k for k in state if k not in keys]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {missing[0]!r} state; "
                                  f"add it to checkpoint.exclude_from_loading or use a full checkpoint")
        t0 = time.perf_counter()
        dcp.load(state, storage_reader=FileSystemReader(str(path)), process_group=self.pg,
                 no_dist=not self.distributed)
        if "optimizer" in state:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        else:
            set_model_state_dict(self.model, state["model"])
        if "lr_scheduler" in state:
            sched = self.lr_scheduler
            sched.load_state_dict(state["lr_scheduler"])
            # The schedule follows the current config (e.g. more training.steps than the saved run):
            # recompute the lr the optimizer's restored param groups would otherwise keep.
            for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(sched.last_epoch)
        if "dataloader" in state:
            self.dataloader.load_state_dict(state["dataloader"])
        if "train_state" in state:
            self.load_train_state(state["train_state"])
        if rng_key is not None:
            torch.set_rng_state(state[rng_key]["cpu"])
            if "cuda" in state[rng_key] and torch.cuda.is_available():
                torch.cuda.set_rng_state(state[rng_key]["cuda"])
        what = "model" if model_only else "model, optimizer, schedule, data position, RNG"
        logger.info(f"loaded {what} from {path} in {time.perf_counter() - t0:.2f}s")

    def close(self) -> None:
        self.wait()
        if self.pg is not None:
            dist.destroy_process_group(self.pg)
            self.pg = None
